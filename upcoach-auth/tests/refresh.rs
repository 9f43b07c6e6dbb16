//! Refresh tokens: the conformance suite on both stores, the refresh races on Postgres,
//! rotation racing revocation, cleanup of expired data, and a Postgres outage.
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo test -p upcoach-auth --all-features --test refresh`

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Barrier;
use upcoach_auth::refresh::{
    DeviceFingerprint, DeviceId, MemoryRefreshStore, PgRefreshStore, RefreshError, RefreshPolicy,
    RefreshStore, RefreshToken, RevokeReason, TokenHash,
};
use upcoach_auth::testing::refresh::{
    FreshIds, PgUserRows, UserFixture, refresh_store_conformance,
};
use upcoach_core::UserId;
use upcoach_core::postgres::PgPoolConfig;
use upcoach_testing::{FaultProxy, PgSchema};

const GRACE: Duration = Duration::from_secs(10);

/// The device the tests' families are bound to and refreshed from.
fn phone() -> Option<DeviceFingerprint> {
    Some(DeviceId::parse("test-phone-0001").unwrap().fingerprint())
}

fn strict() -> RefreshPolicy {
    RefreshPolicy::default()
}

fn lenient() -> RefreshPolicy {
    RefreshPolicy::default().with_grace(GRACE)
}

/// A migrated schema of its own, or `None` (skip) without `DATABASE_URL`.
async fn schema() -> Option<PgSchema> {
    let schema = PgSchema::create().await?;
    upcoach_core::postgres::migrate(schema.pool())
        .await
        .expect("migrations");
    Some(schema)
}

/// A pool of `connections` on the schema (the schema's own pool has 8).
async fn pool(schema: &PgSchema, connections: u32) -> sqlx::PgPool {
    upcoach_core::postgres::connect_with(
        schema.connect_options(),
        &PgPoolConfig {
            max_connections: connections,
            ..PgPoolConfig::default()
        },
    )
    .await
    .expect("connect")
}

/// A store on a pool of its own, made with `config` to `options`.
async fn store_on(
    options: sqlx::postgres::PgConnectOptions,
    config: PgPoolConfig,
) -> PgRefreshStore {
    let pool = upcoach_core::postgres::connect_with(options, &config)
        .await
        .expect("connect");
    PgRefreshStore::new(upcoach_core::postgres::MeteredPool::new(pool))
}

#[tokio::test]
async fn memory_store_conforms() {
    refresh_store_conformance(&MemoryRefreshStore::new(strict()), &FreshIds).await;
}

#[tokio::test]
async fn memory_store_conforms_with_grace() {
    refresh_store_conformance(&MemoryRefreshStore::new(lenient()), &FreshIds).await;
}

#[tokio::test]
async fn memory_store_conforms_with_short_lifetimes() {
    let policy = RefreshPolicy::default()
        .with_token_ttl(Duration::from_secs(600))
        .with_family_lifetime(Duration::from_secs(3_700))
        .with_grace(Duration::from_secs(3));
    refresh_store_conformance(&MemoryRefreshStore::new(policy), &FreshIds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms() {
    let Some(schema) = schema().await else { return };
    let store = PgRefreshStore::new(upcoach_core::postgres::MeteredPool::new(
        schema.pool().clone(),
    ))
    .with_policy(strict());
    refresh_store_conformance(&store, &PgUserRows(schema.pool().clone())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms_with_grace() {
    let Some(schema) = schema().await else { return };
    let store = PgRefreshStore::new(upcoach_core::postgres::MeteredPool::new(
        schema.pool().clone(),
    ))
    .with_policy(lenient());
    refresh_store_conformance(&store, &PgUserRows(schema.pool().clone())).await;
}

#[tokio::test]
async fn memory_store_does_not_grow_with_expired_data() {
    let policy = RefreshPolicy::default()
        .with_token_ttl(Duration::from_secs(3_600))
        .with_family_lifetime(Duration::from_secs(4 * 3_600));
    let store = MemoryRefreshStore::new(policy);
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    // Two days of traffic: every minute a sign-in and a refresh of every live session
    // that is due (each session refreshes every 30 minutes), no explicit purge.
    let mut live: Vec<(SystemTime, RefreshToken)> = Vec::new();
    let mut peak = (0, 0);
    for minute in 0..(48 * 60u64) {
        let now = start + Duration::from_secs(minute * 60);
        let issued = store
            .open_family(UserId::new(), phone(), now)
            .await
            .unwrap();
        live.push((now, issued.token));
        let mut next = Vec::with_capacity(live.len());
        for (last, token) in live.drain(..) {
            if now.duration_since(last).unwrap() < Duration::from_secs(1_800) {
                next.push((last, token));
                continue;
            }
            match store.rotate(token.expose(), phone(), now).await {
                Ok(rotation) => next.push((now, rotation.token)),
                Err(RefreshError::Expired | RefreshError::Invalid) => {}
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        live = next;
        peak = (peak.0.max(store.families()), peak.1.max(store.tokens()));
    }
    // A family lives 4 h (240 sign-ins) and holds at most 8 tokens of 1 h (2 live).
    assert!(peak.0 <= 250, "families held at most: {}", peak.0);
    assert!(peak.1 <= 250 * 3, "tokens held at most: {}", peak.1);
    assert!(live.len() <= 241, "live sessions: {}", live.len());

    // Long after, everything goes.
    let later = start + Duration::from_secs(10 * 86_400);
    let purged = store.purge_expired(later).await.unwrap();
    assert!(purged.families > 0);
    assert_eq!((store.families(), store.tokens()), (0, 0));
}

#[tokio::test]
async fn memory_store_sweeps_a_little_on_every_call() {
    let store = MemoryRefreshStore::new(strict());
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    for _ in 0..1_000 {
        store
            .open_family(UserId::new(), phone(), start)
            .await
            .unwrap();
    }
    assert_eq!(store.families(), 1_000);
    let after = start + strict().family_lifetime;
    let unknown = RefreshToken::generate().unwrap();
    let mut calls = 0;
    while store.families() > 0 {
        let _ = store.rotate(unknown.expose(), phone(), after).await;
        calls += 1;
        assert!(calls <= 40, "each call removes a bounded batch");
    }
    assert!(calls >= 10, "no call removes everything at once: {calls}");
    assert_eq!(store.tokens(), 0);
}

/// Presents one token `n` times at once from two pools (two "processes").
async fn race(
    stores: &[Arc<PgRefreshStore>; 2],
    token: &RefreshToken,
    n: usize,
) -> Vec<Result<upcoach_auth::refresh::Rotation, RefreshError>> {
    let barrier = Arc::new(Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let store = stores[i % 2].clone();
            let barrier = barrier.clone();
            let token = token.expose().to_owned();
            tokio::spawn(async move {
                barrier.wait().await;
                store.rotate(&token, phone(), SystemTime::now()).await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(n);
    for task in tasks {
        results.push(task.await.expect("task"));
    }
    results
}

async fn race_stores(schema: &PgSchema, policy: RefreshPolicy) -> [Arc<PgRefreshStore>; 2] {
    [
        Arc::new(
            PgRefreshStore::new(upcoach_core::postgres::MeteredPool::new(
                pool(schema, 12).await,
            ))
            .with_policy(policy),
        ),
        Arc::new(
            PgRefreshStore::new(upcoach_core::postgres::MeteredPool::new(
                pool(schema, 12).await,
            ))
            .with_policy(policy),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_refresh_race_without_grace_has_one_winner() {
    let Some(schema) = schema().await else { return };
    let stores = race_stores(&schema, strict()).await;
    let users = PgUserRows(schema.pool().clone());
    for round in 0..5 {
        let user = users.create().await;
        let issued = stores[0]
            .open_family(user, phone(), SystemTime::now())
            .await
            .unwrap();
        let results = race(&stores, &issued.token, 50).await;
        let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        let reused = results
            .iter()
            .filter(|r| {
                matches!(r, Err(RefreshError::Reused { user_id, family_id })
                    if *user_id == user && *family_id == issued.family_id)
            })
            .count();
        assert_eq!(winners.len(), 1, "round {round}: exactly one rotation");
        assert_eq!(reused, 49, "round {round}: the rest are reuse: {results:?}");

        // The family ends revoked: the winner's token is dead, and so is every row.
        let err = stores[1]
            .rotate(winners[0].token.expose(), phone(), SystemTime::now())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "refresh_token_revoked");
        let (live, reason): (i64, Option<String>) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM refresh_tokens WHERE family_id = $1 AND revoked_at IS NULL), \
                    (SELECT revoke_reason FROM refresh_families WHERE family_id = $1)",
        )
        .bind(issued.family_id.as_uuid())
        .fetch_one(schema.pool())
        .await
        .unwrap();
        assert_eq!((live, reason.as_deref()), (0, Some("reuse")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_refresh_race_with_grace_has_one_rotation_and_sibling_retries() {
    let Some(schema) = schema().await else { return };
    let stores = race_stores(&schema, lenient()).await;
    let users = PgUserRows(schema.pool().clone());
    for round in 0..5 {
        let user = users.create().await;
        let issued = stores[0]
            .open_family(user, phone(), SystemTime::now())
            .await
            .unwrap();
        let results = race(&stores, &issued.token, 50).await;
        let rotations: Vec<_> = results
            .iter()
            .map(|r| r.as_ref().expect("within the grace every call succeeds"))
            .collect();
        let won = rotations.iter().filter(|r| !r.grace_retry).count();
        let retries = rotations.iter().filter(|r| r.grace_retry).count();
        assert_eq!(
            (won, retries),
            (1, 49),
            "round {round}: one conditional UPDATE won, the rest were grace retries"
        );
        assert!(
            rotations
                .iter()
                .all(|r| r.family_id == issued.family_id && r.user_id == user)
        );
        let tokens: HashSet<&str> = rotations.iter().map(|r| r.token.expose()).collect();
        assert_eq!(tokens.len(), 50, "every caller got its own token");

        // In the database: the parent exchanged once, 50 children of it.
        let (rotated, children): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE rotated_at IS NOT NULL), \
                    count(*) FILTER (WHERE parent_hash = $2) \
             FROM refresh_tokens WHERE family_id = $1",
        )
        .bind(issued.family_id.as_uuid())
        .bind(&issued.token.hash().as_bytes()[..])
        .fetch_one(schema.pool())
        .await
        .unwrap();
        assert_eq!((rotated, children), (1, 50));

        // The client goes on with one child; any other child is then stale: reuse.
        let kept = rotations[round].token.clone();
        let other = rotations[(round + 1) % 50].token.clone();
        stores[0]
            .rotate(kept.expose(), phone(), SystemTime::now())
            .await
            .expect("one child goes on");
        let err = stores[1]
            .rotate(other.expose(), phone(), SystemTime::now())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "refresh_token_reused");
    }
}

/// Rotation and revocation of the same family at the same moment, many times: once the
/// revocation has returned, nothing of the family is live, and a token the rotation
/// handed out (if it won the race) does not rotate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_rotation_racing_revocation_never_leaves_a_live_token() {
    let Some(schema) = schema().await else { return };
    let stores = race_stores(&schema, lenient()).await;
    let users = PgUserRows(schema.pool().clone());
    let user = users.create().await;
    let mut rotated_first = 0;
    for round in 0..200 {
        let now = SystemTime::now();
        let issued = stores[0].open_family(user, phone(), now).await.unwrap();
        let child = stores[0]
            .rotate(issued.token.expose(), phone(), now)
            .await
            .unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let rotate = {
            let (store, barrier) = (stores[round % 2].clone(), barrier.clone());
            let token = child.token.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                store.rotate(token.expose(), phone(), now).await
            })
        };
        let revoke = {
            let (store, barrier) = (stores[(round + 1) % 2].clone(), barrier.clone());
            let (family, token) = (issued.family_id, child.token.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                match round % 3 {
                    0 => store
                        .revoke_family(family, RevokeReason::Admin, now)
                        .await
                        .map(|_| ()),
                    1 => store
                        .revoke_presented(token.expose(), user, now)
                        .await
                        .map(|_| ()),
                    _ => store.revoke_user(user, now).await.map(|_| ()),
                }
            })
        };
        revoke.await.unwrap().expect("revocation");
        // The revocation has returned: nothing of the family is live any more.
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM refresh_tokens t JOIN refresh_families f USING (family_id) \
             WHERE family_id = $1 AND (t.revoked_at IS NULL OR f.revoked_at IS NULL)",
        )
        .bind(issued.family_id.as_uuid())
        .fetch_one(schema.pool())
        .await
        .unwrap();
        let rotation = rotate.await.unwrap();
        match rotation {
            Ok(rotation) => {
                rotated_first += 1;
                let err = stores[0]
                    .rotate(rotation.token.expose(), phone(), now)
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), "refresh_token_revoked", "round {round}");
            }
            Err(e) => assert_eq!(e.code(), "refresh_token_revoked", "round {round}"),
        }
        // Counted after the rotation finished too (it may have committed in between).
        let live_after: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM refresh_tokens WHERE family_id = $1 AND revoked_at IS NULL",
        )
        .bind(issued.family_id.as_uuid())
        .fetch_one(schema.pool())
        .await
        .unwrap();
        assert_eq!((live, live_after), (0, 0), "round {round}");
    }
    eprintln!("rotation won the race in {rotated_first} of 200 rounds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_rotation_racing_revocation_never_leaves_a_live_token() {
    let store = Arc::new(MemoryRefreshStore::new(lenient()));
    for _ in 0..500 {
        let now = SystemTime::now();
        let issued = store
            .open_family(UserId::new(), phone(), now)
            .await
            .unwrap();
        let rotate = {
            let (store, token) = (store.clone(), issued.token.clone());
            tokio::spawn(async move { store.rotate(token.expose(), phone(), now).await })
        };
        store
            .revoke_family(issued.family_id, RevokeReason::Admin, now)
            .await
            .unwrap();
        if let Ok(rotation) = rotate.await.unwrap() {
            let err = store
                .rotate(rotation.token.expose(), phone(), now)
                .await
                .unwrap_err();
            assert_eq!(err.code(), "refresh_token_revoked");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_keeps_only_hashes() {
    let Some(schema) = schema().await else { return };
    let store = PgRefreshStore::new(upcoach_core::postgres::MeteredPool::new(
        schema.pool().clone(),
    ));
    let user = PgUserRows(schema.pool().clone()).create().await;
    let now = SystemTime::now();
    let issued = store.open_family(user, phone(), now).await.unwrap();
    let child = store
        .rotate(issued.token.expose(), phone(), now)
        .await
        .unwrap();

    let rows: Vec<(Vec<u8>, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT token_hash, parent_hash FROM refresh_tokens ORDER BY issued_at, parent_hash NULLS FIRST",
    )
    .fetch_all(schema.pool())
    .await
    .unwrap();
    let root = issued.token.hash().as_bytes().to_vec();
    assert_eq!(
        rows,
        vec![
            (root.clone(), None),
            (child.token.hash().as_bytes().to_vec(), Some(root))
        ]
    );
    // No column anywhere holds the token text.
    let dump: String =
        sqlx::query_scalar("SELECT string_agg(t::text, ' ') FROM (SELECT * FROM refresh_tokens) t")
            .fetch_one(schema.pool())
            .await
            .unwrap();
    assert!(!dump.contains(issued.token.expose()) && !dump.contains(child.token.expose()));
    assert_eq!(TokenHash::of(child.token.expose()), child.token.hash());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_refuses_an_unknown_user() {
    let Some(schema) = schema().await else { return };
    let store = PgRefreshStore::new(upcoach_core::postgres::MeteredPool::new(
        schema.pool().clone(),
    ));
    let err = store
        .open_family(UserId::new(), phone(), SystemTime::now())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "unknown_user");
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_is_a_retryable_backend_error() {
    let Some(schema) = schema().await else { return };
    let user = PgUserRows(schema.pool().clone()).create().await;
    let proxy = FaultProxy::start(upcoach_testing::service_addr(schema.url())).await;
    let store = store_on(
        schema
            .connect_options()
            .host(&proxy.addr().ip().to_string())
            .port(proxy.addr().port()),
        PgPoolConfig {
            acquire_timeout: Duration::from_secs(1),
            ..PgPoolConfig::default()
        },
    )
    .await;
    let issued = store
        .open_family(user, phone(), SystemTime::now())
        .await
        .unwrap();

    proxy.cut();
    let err = store
        .rotate(issued.token.expose(), phone(), SystemTime::now())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "refresh_store_unavailable");
    assert!(err.is_retryable());
    assert!(!format!("{err:?}").contains(issued.token.expose()));
    let err = store
        .revoke_family(issued.family_id, RevokeReason::Logout, SystemTime::now())
        .await
        .unwrap_err();
    assert!(err.is_retryable());

    // Back up: the token was never exchanged, so it rotates now.
    proxy.restore();
    let mut rotated = None;
    for _ in 0..50 {
        match store
            .rotate(issued.token.expose(), phone(), SystemTime::now())
            .await
        {
            Ok(rotation) => {
                rotated = Some(rotation);
                break;
            }
            Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("after the outage: {e:?}"),
        }
    }
    let rotation = rotated.expect("rotation after the outage");
    assert!(!rotation.grace_retry);
    assert_eq!(rotation.family_id, issued.family_id);
}

/// A transaction stuck while it holds a family's row lock (a crashed worker's, a
/// forgotten console session) holds a rotation of that family only until the pool's
/// statement timeout: the rotation then fails as retryable, its connection serves the
/// next request, and once the lock is gone the same token rotates (nothing was changed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_held_by_a_stuck_lock_fails_retryably_at_the_statement_timeout() {
    let Some(schema) = schema().await else { return };
    let user = PgUserRows(schema.pool().clone()).create().await;
    let store = store_on(
        schema.connect_options(),
        PgPoolConfig {
            max_connections: 1,
            statement_timeout: Duration::from_millis(300),
            ..PgPoolConfig::default()
        },
    )
    .await;
    let issued = store
        .open_family(user, phone(), SystemTime::now())
        .await
        .unwrap();

    let mut stuck = schema.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM refresh_families WHERE family_id = $1 FOR UPDATE")
        .bind(issued.family_id.as_uuid())
        .execute(&mut *stuck)
        .await
        .unwrap();
    // A guard against hanging, far above the 300 ms limit; not a measurement.
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        store.rotate(issued.token.expose(), phone(), SystemTime::now()),
    )
    .await
    .expect("the rotation waited for the lock past its statement timeout")
    .unwrap_err();
    assert_eq!(err.code(), "refresh_store_unavailable");
    assert!(err.is_retryable());
    // The pool's only connection came back: another family opens at once.
    store
        .open_family(user, phone(), SystemTime::now())
        .await
        .unwrap();

    stuck.rollback().await.unwrap();
    let rotation = store
        .rotate(issued.token.expose(), phone(), SystemTime::now())
        .await
        .unwrap();
    assert_eq!(rotation.family_id, issued.family_id);
    assert!(!rotation.grace_retry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_keeps_only_the_device_fingerprint() {
    let Some(schema) = schema().await else { return };
    let store = PgRefreshStore::new(upcoach_core::postgres::MeteredPool::new(
        schema.pool().clone(),
    ));
    let user = PgUserRows(schema.pool().clone()).create().await;
    let device = DeviceId::parse("raw-device-id-of-a-phone").unwrap();
    let now = SystemTime::now();
    let bound = store
        .open_family(user, Some(device.fingerprint()), now)
        .await
        .unwrap();
    let unbound = store.open_family(user, None, now).await.unwrap();

    let stored: Vec<(uuid::Uuid, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT family_id, device_fingerprint FROM refresh_families")
            .fetch_all(schema.pool())
            .await
            .unwrap();
    let of = |family: upcoach_core::SessionId| {
        stored
            .iter()
            .find(|(id, _)| *id == family.as_uuid())
            .map(|(_, fingerprint)| fingerprint.clone())
            .unwrap()
    };
    assert_eq!(
        of(bound.family_id),
        Some(device.fingerprint().as_bytes().to_vec())
    );
    assert_eq!(of(unbound.family_id), None);
    let dump: String = sqlx::query_scalar(
        "SELECT string_agg(f::text, ' ') || encode(string_agg(f.device_fingerprint, ''), 'escape') \
         FROM refresh_families f",
    )
    .fetch_one(schema.pool())
    .await
    .unwrap();
    assert!(!dump.contains(device.expose()), "{dump}");

    // A fingerprint that is not 32 bytes is refused by the table itself.
    let short = sqlx::query(
        "UPDATE refresh_families SET device_fingerprint = '\\x00' WHERE family_id = $1",
    )
    .bind(unbound.family_id.as_uuid())
    .execute(schema.pool())
    .await
    .unwrap_err();
    assert!(
        short
            .to_string()
            .contains("refresh_families_device_fingerprint_len"),
        "{short}"
    );

    // A mismatch is kept as the revocation's reason.
    let other = DeviceId::parse("another-device").unwrap();
    let err = store
        .rotate(bound.token.expose(), Some(other.fingerprint()), now)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "device_mismatch");
    let reason: Option<String> =
        sqlx::query_scalar("SELECT revoke_reason FROM refresh_families WHERE family_id = $1")
            .bind(bound.family_id.as_uuid())
            .fetch_one(schema.pool())
            .await
            .unwrap();
    assert_eq!(reason.as_deref(), Some("device_mismatch"));
}

/// A family written before the device-binding migration (its column `NULL` once the
/// migration runs) is not bound: it rotates from any device, and from none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_families_from_before_device_binding_are_not_bound() {
    const DEVICE_BINDING: i64 = 20261206000001;
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let migrations = upcoach_core::postgres::MIGRATOR.iter();
    let (before, from): (Vec<_>, Vec<_>) = migrations.partition(|m| m.version < DEVICE_BINDING);
    assert!(!before.is_empty() && from.iter().any(|m| m.version == DEVICE_BINDING));
    for migration in before {
        sqlx::raw_sql(migration.sql.clone())
            .execute(schema.pool())
            .await
            .unwrap();
    }
    // A sign-in of the old code: a user, a family, its first token.
    let user = PgUserRows(schema.pool().clone()).create().await;
    let token = RefreshToken::generate().unwrap();
    let family = uuid::Uuid::new_v4();
    sqlx::query(
        "WITH family AS ( \
           INSERT INTO refresh_families (family_id, user_id, created_at, expires_at) \
           VALUES ($1, $2, now(), now() + interval '90 days')) \
         INSERT INTO refresh_tokens \
           (token_hash, family_id, parent_hash, user_id, issued_at, expires_at, family_expires_at) \
         VALUES ($3, $1, NULL, $2, now(), now() + interval '30 days', now() + interval '90 days')",
    )
    .bind(family)
    .bind(user.as_uuid())
    .bind(&token.hash().as_bytes()[..])
    .execute(schema.pool())
    .await
    .unwrap();
    for migration in from {
        sqlx::raw_sql(migration.sql.clone())
            .execute(schema.pool())
            .await
            .unwrap();
    }

    let store = PgRefreshStore::new(upcoach_core::postgres::MeteredPool::new(
        schema.pool().clone(),
    ));
    let mut current = token;
    for presented in [
        None,
        phone(),
        Some(DeviceId::parse("another-device").unwrap().fingerprint()),
    ] {
        let rotation = store
            .rotate(current.expose(), presented, SystemTime::now())
            .await
            .unwrap_or_else(|e| panic!("a family from before binding, from {presented:?}: {e:?}"));
        assert_eq!(rotation.family_id.as_uuid(), family);
        current = rotation.token;
    }
}
