//! Refresh-token rotation on Postgres: rotations per second at 1 and 32 concurrent
//! clients (each client its own family, refreshing as fast as it can), beside a bare
//! baseline in the same run:
//!
//! - `bare_conditional_update`: the exchange alone as one autocommit statement (the
//!   conditional `UPDATE … RETURNING` feeding the child's `INSERT`), with no family lock,
//!   no sibling check and no transaction: the least a rotation can cost.
//! - `pg_refresh_store`: [`PgRefreshStore::rotate`]: a transaction that locks the
//!   family's row, then the same exchange with the sibling and family checks (four round
//!   trips), and a fresh token from the OS RNG.
//!
//! Needs `DATABASE_URL`; skipped (said so) without it. The figures are printed at the
//! end as well as by criterion.
//!
//! `cargo bench --bench refresh`

#[allow(dead_code, reason = "this bench needs runtime() only")]
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::runtime;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use upcoach_auth::refresh::{PgRefreshStore, RefreshStore, RefreshToken, TokenHash};
use upcoach_core::UserId;
use upcoach_core::postgres::PgPoolConfig;

const CLIENTS: [usize; 2] = [1, 32];

/// Rotations done and time spent, per benchmark, for the summary.
type Tally = Arc<Mutex<Vec<(String, u64, Duration)>>>;

/// How many of `iters` rotations client `i` of `n` does.
fn share(iters: u64, i: usize, n: usize) -> u64 {
    iters / n as u64 + u64::from((i as u64) < iters % n as u64)
}

async fn bare_rotate(pool: &sqlx::PgPool, presented: &TokenHash) -> TokenHash {
    let child = RefreshToken::generate().unwrap().hash();
    let rotated = sqlx::query(
        "WITH rotated AS ( \
           UPDATE refresh_tokens SET rotated_at = now() \
           WHERE token_hash = $1 AND rotated_at IS NULL AND revoked_at IS NULL \
             AND expires_at > now() \
           RETURNING family_id, user_id, family_expires_at \
         ) \
         INSERT INTO refresh_tokens \
           (token_hash, family_id, parent_hash, user_id, issued_at, expires_at, family_expires_at) \
         SELECT $2, family_id, $1, user_id, now(), \
                LEAST(now() + interval '30 days', family_expires_at), family_expires_at \
         FROM rotated",
    )
    .bind(&presented.as_bytes()[..])
    .bind(&child.as_bytes()[..])
    .execute(pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(rotated, 1, "the bare exchange rotated");
    child
}

fn refresh_rotation(c: &mut Criterion) {
    if std::env::var("DATABASE_URL").is_err() {
        eprintln!("skipping refresh_rotation: DATABASE_URL is not set");
        return;
    }
    let rt = runtime();
    let Some(schema) = rt.block_on(upcoach_testing::PgSchema::create()) else {
        return;
    };
    rt.block_on(upcoach_core::postgres::migrate(schema.pool()))
        .unwrap();
    let pool = rt
        .block_on(upcoach_core::postgres::connect_with(
            schema.connect_options(),
            &PgPoolConfig {
                max_connections: 40,
                ..PgPoolConfig::default()
            },
        ))
        .unwrap();
    let user = UserId::new();
    rt.block_on(
        sqlx::query("INSERT INTO users (id) VALUES ($1)")
            .bind(user.as_uuid())
            .execute(&pool),
    )
    .unwrap();
    let store = Arc::new(PgRefreshStore::new(
        upcoach_core::postgres::MeteredPool::new(pool.clone()),
    ));
    let tally: Tally = Arc::default();

    let mut group = c.benchmark_group("refresh_rotation");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(1));

    for clients in CLIENTS {
        // Each client's newest token (as a hash for the bare baseline).
        let open = |n: usize| {
            rt.block_on(async {
                let mut tokens = Vec::with_capacity(n);
                for _ in 0..n {
                    tokens.push(
                        store
                            .open_family(user, None, SystemTime::now())
                            .await
                            .unwrap()
                            .token,
                    );
                }
                tokens
            })
        };

        let mut bare: Vec<TokenHash> = open(clients).iter().map(RefreshToken::hash).collect();
        let name = format!("bare_conditional_update/{clients}_clients");
        group.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                let tasks: Vec<_> = bare
                    .drain(..)
                    .enumerate()
                    .map(|(i, mut current)| {
                        let pool = pool.clone();
                        let n = share(iters, i, clients);
                        rt.spawn(async move {
                            for _ in 0..n {
                                current = bare_rotate(&pool, &current).await;
                            }
                            current
                        })
                    })
                    .collect();
                bare = rt.block_on(async {
                    let mut next = Vec::with_capacity(tasks.len());
                    for task in tasks {
                        next.push(task.await.unwrap());
                    }
                    next
                });
                let elapsed = start.elapsed();
                tally.lock().unwrap().push((name.clone(), iters, elapsed));
                elapsed
            })
        });

        let mut tokens = open(clients);
        let name = format!("pg_refresh_store/{clients}_clients");
        group.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                let tasks: Vec<_> = tokens
                    .drain(..)
                    .enumerate()
                    .map(|(i, mut current)| {
                        let store = store.clone();
                        let n = share(iters, i, clients);
                        rt.spawn(async move {
                            for _ in 0..n {
                                current = store
                                    .rotate(current.expose(), None, SystemTime::now())
                                    .await
                                    .unwrap()
                                    .token;
                            }
                            current
                        })
                    })
                    .collect();
                tokens = rt.block_on(async {
                    let mut next = Vec::with_capacity(tasks.len());
                    for task in tasks {
                        next.push(task.await.unwrap());
                    }
                    next
                });
                let elapsed = start.elapsed();
                tally.lock().unwrap().push((name.clone(), iters, elapsed));
                elapsed
            })
        });
    }
    group.finish();

    // The summary, from the measured runs (warm-up included).
    let tally = tally.lock().unwrap();
    let mut names: Vec<&String> = tally.iter().map(|(name, _, _)| name).collect();
    names.dedup();
    eprintln!("\nrefresh rotations on Postgres (rotations/s over every run of each benchmark):");
    for name in names {
        let (count, time) = tally
            .iter()
            .filter(|(n, _, _)| n == name)
            .fold((0u64, Duration::ZERO), |(c, t), (_, i, e)| (c + i, t + *e));
        eprintln!(
            "  {name:<42} {:>8.0}/s  ({count} rotations)",
            count as f64 / time.as_secs_f64()
        );
    }
    drop(tally);
    rt.block_on(pool.close());
    drop(schema);
}

criterion_group!(benches, refresh_rotation);
criterion_main!(benches);
