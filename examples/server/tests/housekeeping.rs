//! The server's background housekeeping: expired refresh tokens leave Postgres.

mod support;

use std::time::{Duration, SystemTime};

use support::Running;
use upcoach_auth::refresh::{PgRefreshStore, RefreshStore};
use upcoach_auth::users::{PgUserStore, UserStore};
use upcoach_core::UserId;
use upcoach_server::{Options, ServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_refresh_families_are_purged_and_live_ones_kept() {
    let Some(schema) = upcoach_testing::PgSchema::create().await else {
        return;
    };
    let mut url = url::Url::parse(schema.url()).unwrap();
    url.query_pairs_mut()
        .append_pair("options", &format!("-c search_path={}", schema.name()));
    let mut config = ServerConfig::default();
    config.services.database_url =
        Some(upcoach_core::config::ServiceUrl::parse(url.as_str(), &["postgres"]).unwrap());
    let server = Running::start(
        config,
        Options {
            refresh_purge_every: Some(Duration::from_millis(200)),
            ..Default::default()
        },
    )
    .await;

    // The server migrated the schema; the test writes through a store of its own.
    let store = PgRefreshStore::new(upcoach_core::postgres::MeteredPool::new(
        schema.pool().clone(),
    ));
    let users = PgUserStore::new(upcoach_core::postgres::MeteredPool::new(
        schema.pool().clone(),
    ));
    let (old_user, user) = (UserId::new(), UserId::new());
    for id in [old_user, user] {
        users.provision(id, &[]).await.unwrap();
    }
    let long_ago = SystemTime::now() - Duration::from_secs(200 * 24 * 3600);
    let expired = store.open_family(old_user, None, long_ago).await.unwrap();
    let live = store
        .open_family(user, None, SystemTime::now())
        .await
        .unwrap();
    let families = || async {
        sqlx::query_scalar::<_, String>("SELECT family_id::text FROM refresh_families")
            .fetch_all(schema.pool())
            .await
            .unwrap()
    };
    assert_eq!(families().await.len(), 2);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while families().await.len() == 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired family is still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(families().await, [live.family_id.as_uuid().to_string()]);
    assert_ne!(expired.family_id, live.family_id);
    let rotated = store
        .rotate(live.token.expose(), None, SystemTime::now())
        .await
        .expect("the live family still works");
    assert_eq!(rotated.family_id, live.family_id);

    // The counter is bumped once the whole round is done, a moment after the rows go.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = support::get_text(server.addr, "/metrics").await;
        if text.contains(r#"refresh_purged_total{what="families"} 1"#) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}
