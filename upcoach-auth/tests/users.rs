//! The user store: the conformance suite against memory and Postgres, first sign-ins
//! racing on several threads, stored data this crate did not write, and an outage.

use std::sync::Arc;
use std::time::Duration;

use upcoach_auth::testing::users::an_identity;
use upcoach_auth::testing::users::user_store_conformance;
use upcoach_auth::users::{LinkingPolicy, MemoryUserStore, PgUserStore, SignIn, UserStore};
use upcoach_auth::{ProviderId, VerifiedIdentity};
use upcoach_core::postgres;
use upcoach_testing::{FaultProxy, PgSchema};

async fn pg_store() -> Option<(PgSchema, PgUserStore)> {
    let schema = PgSchema::create().await?;
    postgres::migrate(schema.pool()).await.unwrap();
    let store = PgUserStore::new(upcoach_core::postgres::MeteredPool::new(
        schema.pool().clone(),
    ));
    Some((schema, store))
}

#[tokio::test]
async fn memory_store_conforms() {
    user_store_conformance(&MemoryUserStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_conforms() {
    let Some((_schema, store)) = pg_store().await else {
        return;
    };
    user_store_conformance(&store).await;
}

/// 16 tasks on 4 threads sign in with each of several new identities at once (with an
/// address, without one, and two providers sharing an address): one user per identity,
/// the same user for the shared address.
async fn racing_first_sign_ins(store: Arc<dyn UserStore>) {
    for round in 0..5 {
        let kim = an_identity(
            ProviderId::GOOGLE,
            &format!("kim-{round}"),
            Some(&format!("kim-{round}@race.example")),
        );
        let anon = an_identity(ProviderId::GOOGLE, &format!("anon-{round}"), None);
        let kim_apple = an_identity(
            ProviderId::APPLE,
            &format!("kim-apple-{round}"),
            Some(&format!("KIM-{round}@race.example")),
        );
        let mut tasks = Vec::new();
        for i in 0..16 {
            let store = store.clone();
            let identity = [&kim, &anon, &kim_apple][i % 3].clone();
            tasks.push(tokio::spawn(async move {
                let result = store.sign_in(&identity, &LinkingPolicy::default()).await;
                (identity, result)
            }));
        }
        let mut results: Vec<(VerifiedIdentity, SignIn)> = Vec::new();
        for task in tasks {
            let (identity, result) = task.await.unwrap();
            results.push((identity, result.expect("a racing sign-in succeeds")));
        }
        let of = |who: &VerifiedIdentity| -> Vec<&SignIn> {
            results
                .iter()
                .filter(|(i, _)| i == who)
                .map(|(_, s)| s)
                .collect()
        };
        let (kims, anons, apples) = (of(&kim), of(&anon), of(&kim_apple));
        assert_eq!(
            anons.iter().filter(|s| s.created).count(),
            1,
            "round {round}: one user for the identity without an address"
        );
        assert!(anons.iter().all(|s| s.user.id == anons[0].user.id));
        let shared: Vec<&&SignIn> = kims.iter().chain(apples.iter()).collect();
        assert!(
            shared.iter().all(|s| s.user.id == shared[0].user.id),
            "round {round}: one user for the shared address"
        );
        assert_eq!(shared.iter().filter(|s| s.created).count(), 1);
        assert_eq!(
            shared.iter().filter(|s| s.linked).count(),
            1,
            "round {round}: the other provider linked once"
        );
        let user = store.get(shared[0].user.id).await.unwrap().unwrap();
        assert_eq!(user.providers.len(), 2, "round {round}: {user:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_first_sign_ins_race_on_threads() {
    racing_first_sign_ins(Arc::new(MemoryUserStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_first_sign_ins_race_on_threads() {
    let Some((_schema, store)) = pg_store().await else {
        return;
    };
    racing_first_sign_ins(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reports_data_it_did_not_write_as_corrupt() {
    let Some((schema, store)) = pg_store().await else {
        return;
    };
    let user = store
        .sign_in(
            &an_identity(ProviderId::GOOGLE, "g", None),
            &LinkingPolicy::default(),
        )
        .await
        .unwrap()
        .user;
    sqlx::query("UPDATE users SET roles = ARRAY['Not A Role'] WHERE id = $1")
        .bind(user.id.as_uuid())
        .execute(schema.pool())
        .await
        .unwrap();
    let err = store.get(user.id).await.unwrap_err();
    assert_eq!(err.code(), "internal_error", "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_enforces_one_identity_per_provider_per_user() {
    let Some((schema, store)) = pg_store().await else {
        return;
    };
    let user = store
        .sign_in(
            &an_identity(ProviderId::GOOGLE, "g-1", None),
            &LinkingPolicy::default(),
        )
        .await
        .unwrap()
        .user;
    let direct = sqlx::query(
        "INSERT INTO user_identities (provider, subject, user_id) VALUES ('google', 'g-2', $1)",
    )
    .bind(user.id.as_uuid())
    .execute(schema.pool())
    .await;
    let err = direct.expect_err("the database refuses a second google identity");
    assert!(
        err.as_database_error()
            .is_some_and(|e| e.is_unique_violation()),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_is_a_retryable_error_and_passes() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    postgres::migrate(schema.pool()).await.unwrap();
    let proxy = FaultProxy::start(upcoach_testing::service_addr(schema.url())).await;
    let options = schema
        .connect_options()
        .host(&proxy.addr().ip().to_string())
        .port(proxy.addr().port());
    let pool = postgres::connect_with(
        options,
        &postgres::PgPoolConfig {
            max_connections: 2,
            acquire_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let store = PgUserStore::new(upcoach_core::postgres::MeteredPool::new(pool));
    let ada = an_identity(ProviderId::GOOGLE, "ada", Some("ada@outage.example"));
    let policy = LinkingPolicy::default();
    let user = store.sign_in(&ada, &policy).await.unwrap().user;

    proxy.cut();
    let started = std::time::Instant::now();
    let err = store.sign_in(&ada, &policy).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(err.code(), "user_store_unavailable");
    assert!(store.get(user.id).await.unwrap_err().is_retryable());
    assert!(started.elapsed() < Duration::from_secs(5), "no call hangs");

    proxy.restore();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store.sign_in(&ada, &policy).await {
            Ok(again) => {
                assert_eq!(again.user.id, user.id);
                assert!(!again.created);
                break;
            }
            Err(e) => {
                assert!(e.is_retryable(), "{e:?}");
                assert!(
                    std::time::Instant::now() < deadline,
                    "Postgres is back within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
