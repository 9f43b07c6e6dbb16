//! `MeteredPool` against real Postgres: the count of tasks waiting for a connection, its
//! peak, and the stores taking their connections through it.

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use upcoach_auth::users::{PgUserStore, UserStore};
use upcoach_core::postgres::{self, MeteredPool};
use upcoach_core::{Role, UserId};
use upcoach_testing::PgSchema;

/// A pool of one connection on the test's schema.
async fn one_connection(schema: &PgSchema, acquire_timeout: Duration) -> MeteredPool {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(acquire_timeout)
        .connect_with(schema.connect_options())
        .await
        .expect("connect to the test schema");
    MeteredPool::new(pool)
}

/// Polls until `pool.waiting()` is `n`, failing after 10 s.
async fn until_waiting(pool: &MeteredPool, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pool.waiting() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waiting stayed {} instead of {n}",
            pool.waiting()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_counted_until_they_hold_a_connection() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let pool = one_connection(&schema, Duration::from_secs(30)).await;
    assert_eq!(pool.waiting(), 0);
    let held = pool.acquire().await.unwrap();
    assert_eq!(pool.waiting(), 0, "a held connection is not a wait");
    assert_eq!(pool.take_peak_waiting(), 1, "the acquire itself was inside");
    assert_eq!(
        pool.take_peak_waiting(),
        0,
        "the peak restarts from the present"
    );

    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut conn = pool.acquire().await.unwrap();
                sqlx::query_scalar::<_, i32>("SELECT $1")
                    .bind(i)
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap()
            })
        })
        .collect();
    until_waiting(&pool, 3).await;
    assert_eq!(pool.size(), 1);
    assert_eq!(pool.num_idle(), 0);
    assert_eq!(pool.take_peak_waiting(), 3);

    drop(held);
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers.sort_unstable();
    assert_eq!(answers, [0, 1, 2]);
    assert_eq!(pool.waiting(), 0);
    assert_eq!(
        pool.take_peak_waiting(),
        3,
        "three were waiting when the interval began"
    );
    assert_eq!(pool.take_peak_waiting(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_that_times_out_or_is_dropped_leaves_the_count() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let pool = one_connection(&schema, Duration::from_millis(200)).await;
    let held = pool.acquire().await.unwrap();

    // The pool's own timeout.
    let error = pool.acquire().await.unwrap_err();
    assert!(matches!(error, sqlx::Error::PoolTimedOut), "{error:?}");
    assert_eq!(pool.waiting(), 0);

    // The caller giving up first.
    let gave_up = tokio::time::timeout(Duration::from_millis(20), pool.acquire()).await;
    assert!(gave_up.is_err(), "no connection was free");
    assert_eq!(pool.waiting(), 0);

    drop(held);

    // A waiting task that is aborted (a pool with a long timeout, so only the abort
    // can end the wait).
    let pool = one_connection(&schema, Duration::from_secs(60)).await;
    let held = pool.acquire().await.unwrap();
    let task = tokio::spawn({
        let pool = pool.clone();
        async move { pool.acquire().await.map(drop) }
    });
    until_waiting(&pool, 1).await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(pool.waiting(), 0);

    // Closing the pool fails its waiters, which leave the count.
    let task = tokio::spawn({
        let pool = pool.clone();
        async move { pool.acquire().await.map(drop) }
    });
    until_waiting(&pool, 1).await;
    let closing = tokio::spawn({
        let pool = pool.clone();
        async move { pool.close().await }
    });
    let outcome = task.await.unwrap();
    assert!(
        matches!(outcome, Err(sqlx::Error::PoolClosed)),
        "{outcome:?}"
    );
    assert_eq!(pool.waiting(), 0);
    drop(held);
    closing.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_wait_for_the_pool_they_share() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    postgres::migrate(schema.pool()).await.unwrap();
    let pool = one_connection(&schema, Duration::from_secs(30)).await;
    let users = PgUserStore::new(pool.clone());
    let log = upcoach_core::event::PgEventLog::new(pool.clone());
    let user = UserId::new();
    users.provision(user, &[Role::COACH]).await.unwrap();

    let held = pool.acquire().await.unwrap();
    let get = tokio::spawn({
        let users = users.clone();
        async move { users.get(user).await }
    });
    let recent = tokio::spawn(async move {
        use upcoach_core::event::{EventKind, EventLog};
        log.recent(EventKind::Security, 10).await
    });
    until_waiting(&pool, 2).await;
    assert!(!get.is_finished() && !recent.is_finished());

    drop(held);
    let found = get.await.unwrap().unwrap().expect("the provisioned user");
    assert_eq!(found.id, user);
    assert!(recent.await.unwrap().unwrap().is_empty());
    assert_eq!(pool.waiting(), 0);

    let elapsed = postgres::ping(&pool).await.unwrap();
    assert!(elapsed < Duration::from_secs(30));
}

/// Every connection carries the pool's statement timeout: a statement past it is
/// cancelled by Postgres (SQLSTATE 57014) and the connection serves the next one. The
/// migrations run without it, and the connection they ran on has it back afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_past_the_pools_timeout_are_cancelled_and_migrations_are_not_limited() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let config = postgres::PgPoolConfig {
        max_connections: 1,
        statement_timeout: Duration::from_millis(250),
        ..postgres::PgPoolConfig::default()
    };
    let pool = MeteredPool::new(
        postgres::connect_with(schema.connect_options(), &config)
            .await
            .unwrap(),
    );
    let shown = |pool: MeteredPool| async move {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query_scalar::<_, String>("SHOW statement_timeout")
            .fetch_one(&mut *conn)
            .await
            .unwrap()
    };
    assert_eq!(shown(pool.clone()).await, "250ms");

    // The pool's only connection runs the migrations, then has its limit back.
    postgres::migrate(pool.inner()).await.unwrap();
    assert_eq!(shown(pool.clone()).await, "250ms");

    let mut conn = pool.acquire().await.unwrap();
    let err = sqlx::query("SELECT pg_sleep(5)")
        .execute(&mut *conn)
        .await
        .unwrap_err();
    let code = err.as_database_error().and_then(|e| e.code());
    assert_eq!(code.as_deref(), Some("57014"), "{err:?}");
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    drop(conn);

    // Zero leaves Postgres' own setting (no limit on this server).
    let unlimited = MeteredPool::new(
        postgres::connect_with(
            schema.connect_options(),
            &postgres::PgPoolConfig {
                statement_timeout: Duration::ZERO,
                ..config
            },
        )
        .await
        .unwrap(),
    );
    assert_eq!(shown(unlimited).await, "0");
}
