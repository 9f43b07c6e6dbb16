//! Foundation benchmarks, each beside its raw baseline in the same run:
//!
//! - `event_log_record`: the cost a caller pays to record an audit event in memory, vs a
//!   bare `tokio::sync::mpsc::try_send` of the same event.
//! - `event_log_postgres`: events per second through the batched Postgres writer
//!   (record 10,000 + flush), vs the same rows inserted directly with the same
//!   statement shape by bare sqlx. Needs `DATABASE_URL`; skipped (said so) without it.
//! - `access_token_verify`: our `TokenVerifier` vs bare `jsonwebtoken::decode` with the
//!   same key and checks: a token checked in full (`first_time`), and one seen before,
//!   answered from the memory of verified tokens (`seen_before`, the default).
//!
//! `cargo bench --bench foundation`

mod common;

use common::{ready, runtime};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use upcoach_auth::session::{AccessClaims, AccessTokens, SigningKey};
use upcoach_core::event::{Event, EventLog, MemoryEventLog, PgEventLog, SecurityEvent};
use upcoach_core::{Role, SessionId, SystemClock, TokenVerifier, UserId};

fn sample_event() -> Event {
    SecurityEvent::new("login_succeeded", &SystemClock)
        .user(UserId::new())
        .platform("web")
        .ip("203.0.113.7".parse().unwrap())
        .details(serde_json::json!({"provider": "google", "attempt": 1}))
        .into()
}

fn event_log_record(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("event_log_record");
    let event = sample_event();

    // Baseline: hand the event to a channel that a task drains.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(1 << 16);
    rt.spawn(async move { while rx.recv().await.is_some() {} });
    group.bench_function("bare_mpsc_try_send", |b| {
        b.iter(|| {
            let _ = tx.try_send(event.clone());
        })
    });

    let memory = MemoryEventLog::new(10_000);
    group.bench_function("memory_ring_buffer", |b| {
        b.iter(|| memory.record(event.clone()).unwrap())
    });
    group.finish();
}

fn event_log_postgres(c: &mut Criterion) {
    const EVENTS: usize = 10_000;
    let rt = runtime();
    let Some(schema) = rt.block_on(upcoach_testing::PgSchema::create()) else {
        return;
    };
    rt.block_on(upcoach_core::postgres::migrate(schema.pool()))
        .unwrap();
    let pool = schema.pool().clone();
    let log = rt.block_on(async {
        PgEventLog::new(upcoach_core::postgres::MeteredPool::new(pool.clone()))
    });

    let mut group = c.benchmark_group("event_log_postgres");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(EVENTS as u64));

    // Baseline: the same rows, inserted directly in batches of 500 with UNNEST.
    group.bench_function("bare_sqlx_unnest_10k", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    for _ in 0..EVENTS / 500 {
                        let ids: Vec<uuid::Uuid> = (0..500).map(|_| uuid::Uuid::now_v7()).collect();
                        let users: Vec<Option<uuid::Uuid>> =
                            (0..500).map(|_| Some(uuid::Uuid::now_v7())).collect();
                        let types = vec!["login_succeeded"; 500];
                        let platforms = vec![Some("web"); 500];
                        let details = vec![r#"{"attempt":1,"provider":"google"}"#; 500];
                        let ips = vec![Some("203.0.113.7"); 500];
                        let agents: Vec<Option<&str>> = vec![None; 500];
                        sqlx::query(
                            "INSERT INTO security_events \
                             (id, user_id, event_type, platform, details, ip_address, user_agent, created_at) \
                             SELECT id, user_id, event_type, platform, details::jsonb, ip_address::inet, user_agent, now() \
                             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[]) \
                             AS t(id, user_id, event_type, platform, details, ip_address, user_agent) \
                             ON CONFLICT (id) DO NOTHING",
                        )
                        .bind(ids)
                        .bind(users)
                        .bind(types)
                        .bind(platforms)
                        .bind(details)
                        .bind(ips)
                        .bind(agents)
                        .execute(&pool)
                        .await
                        .unwrap();
                    }
                }
                start.elapsed()
            })
        })
    });

    group.bench_function("pg_event_log_record_then_flush_10k", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    for _ in 0..EVENTS {
                        log.record(sample_event()).unwrap();
                    }
                    log.flush().await.unwrap();
                }
                start.elapsed()
            })
        })
    });
    group.finish();
    drop(schema);
}

fn access_token_verify(c: &mut Criterion) {
    let tokens = AccessTokens::new(SigningKey::from_seed(&[42; 32]), Arc::new(SystemClock));
    let token = tokens
        .issue(
            UserId::new(),
            vec![Role::ADMIN, Role::COACH],
            SessionId::new(),
        )
        .unwrap()
        .token;
    let x = tokens.jwks()["keys"][0]["x"].as_str().unwrap().to_owned();
    let bare_key = DecodingKey::from_ed_components(&x).unwrap();
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_issuer(&["upcoach"]);
    validation.set_audience(&["upcoach"]);

    let mut group = c.benchmark_group("access_token_verify");
    group.bench_function("bare_jsonwebtoken_decode", |b| {
        b.iter(|| jsonwebtoken::decode::<AccessClaims>(&token, &bare_key, &validation).unwrap())
    });
    // Every presentation checked in full (the memory of verified tokens turned off).
    let first_time = AccessTokens::new(SigningKey::from_seed(&[42; 32]), Arc::new(SystemClock))
        .with_verified_cache(0);
    group.bench_function("upcoach_access_tokens_first_time", |b| {
        b.iter(|| ready(first_time.verify(&token)).unwrap())
    });
    // The default: a token seen before is answered from the memory of verified tokens.
    group.bench_function("upcoach_access_tokens_seen_before", |b| {
        b.iter(|| ready(tokens.verify(&token)).unwrap())
    });
    group.finish();
}

criterion_group!(
    benches,
    event_log_record,
    access_token_verify,
    event_log_postgres
);
criterion_main!(benches);
