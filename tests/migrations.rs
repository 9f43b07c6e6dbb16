//! The embedded migrations on a fresh schema: twice without error, every table and index.

use upcoach_core::postgres;
use upcoach_testing::PgSchema;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_twice_and_create_every_table_and_index() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    postgres::migrate(schema.pool()).await.expect("first run");
    postgres::migrate(schema.pool())
        .await
        .expect("second run is a no-op");

    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
    )
    .bind(schema.name())
    .fetch_all(schema.pool())
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            "_sqlx_migrations",
            "data_deletion_requests",
            "refresh_families",
            "refresh_tokens",
            "security_events",
            "system_alerts",
            "unlinked_identities",
            "user_identities",
            "users",
            "websocket_events"
        ]
    );

    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 ORDER BY 1",
    )
    .bind(schema.name())
    .fetch_all(schema.pool())
    .await
    .unwrap();
    for expected in [
        "idx_security_events_user_id",
        "idx_security_events_created_at",
        "idx_security_events_type_created_at",
        "idx_websocket_events_user_id",
        "idx_websocket_events_created_at",
        "idx_system_alerts_level",
        "idx_system_alerts_created_at",
        "idx_users_email",
        "idx_user_identities_user_id",
        "user_identities_provider_subject_key",
        "idx_refresh_tokens_family_id",
        "idx_refresh_tokens_user_id",
        "idx_refresh_families_user_id",
        "idx_refresh_tokens_parent_hash",
        "user_identities_user_provider_key",
        "idx_user_identities_email",
        "data_deletion_requests_subject_hash_key",
        "idx_data_deletion_requests_requested_at",
        "unlinked_identities_pkey",
    ] {
        assert!(
            indexes.iter().any(|i| i == expected),
            "missing index {expected}: {indexes:?}"
        );
    }

    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(schema.pool())
        .await
        .unwrap();
    assert_eq!(applied as usize, postgres::MIGRATOR.iter().count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_is_unique_per_provider_and_subject() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    postgres::migrate(schema.pool()).await.unwrap();
    let pool = schema.pool();
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    for id in [a, b] {
        sqlx::query("INSERT INTO users (id, email) VALUES ($1, 'same@example.com')")
            .bind(id)
            .execute(pool)
            .await
            .expect("e-mail is not a key: two users may share it");
    }
    let link = |user| {
        sqlx::query("INSERT INTO user_identities (provider, subject, user_id) VALUES ('google', 'sub-1', $1)")
            .bind(user)
            .execute(pool)
    };
    link(a).await.unwrap();
    let err = link(b).await.expect_err("(provider, subject) is unique");
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("23505")
    );
    sqlx::query(
        "INSERT INTO user_identities (provider, subject, user_id) VALUES ('apple', 'sub-1', $1)",
    )
    .bind(b)
    .execute(pool)
    .await
    .expect("the same subject at another provider is another identity");
    sqlx::query(
        "INSERT INTO system_alerts (id, level, message, source) VALUES ('x', 'loud', 'm', 's')",
    )
    .execute(pool)
    .await
    .expect_err("alert levels are checked");
}
