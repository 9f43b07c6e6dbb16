//! Data-deletion requests: the conformance suite against memory and Postgres, records of
//! one subject racing on several threads, the memory store's bound, what the Postgres
//! table keeps (no subject in clear, expired rows purged), and an outage.
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo test -p upcoach-auth --all-features --test deletion`

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Barrier;
use upcoach_auth::ProviderId;
use upcoach_auth::deletion::{
    ConfirmationCode, DeletionOutcome, DeletionStore, MemoryDeletionStore, PgDeletionStore,
    RETENTION, SubjectHash,
};
use upcoach_auth::testing::deletion::deletion_store_conformance;
use upcoach_core::postgres::{self, MeteredPool};
use upcoach_testing::{FaultProxy, PgSchema};

fn facebook() -> ProviderId {
    "facebook".parse().unwrap()
}

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000)
}

async fn pg_store() -> Option<(PgSchema, PgDeletionStore)> {
    let schema = PgSchema::create().await?;
    postgres::migrate(schema.pool()).await.unwrap();
    let store = PgDeletionStore::new(MeteredPool::new(schema.pool().clone()));
    Some((schema, store))
}

#[tokio::test]
async fn memory_store_conforms() {
    deletion_store_conformance(&MemoryDeletionStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_conforms() {
    let Some((_schema, store)) = pg_store().await else {
        return;
    };
    deletion_store_conformance(&store).await;
}

/// 16 tasks on 4 threads record one subject at once, for several subjects: one request
/// (one code) per subject, and one row per subject.
async fn racing_records(store: Arc<dyn DeletionStore>) {
    for round in 0..5 {
        let subject = format!("race-{round}");
        let barrier = Arc::new(Barrier::new(16));
        let mut tasks = Vec::new();
        for i in 0..16 {
            let (store, barrier, subject) = (store.clone(), barrier.clone(), subject.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                store
                    .record(facebook(), &subject, t0() + Duration::from_millis(i))
                    .await
            }));
        }
        let mut codes = Vec::new();
        for task in tasks {
            let request = task.await.unwrap().expect("a racing record succeeds");
            codes.push(request.code);
        }
        assert!(
            codes.iter().all(|c| *c == codes[0]),
            "round {round}: one code for one subject: {codes:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_records_race_on_threads() {
    racing_records(Arc::new(MemoryDeletionStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_records_race_on_threads() {
    let Some((schema, store)) = pg_store().await else {
        return;
    };
    racing_records(Arc::new(store)).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM data_deletion_requests")
        .fetch_one(schema.pool())
        .await
        .unwrap();
    assert_eq!(rows, 5, "one row per subject");
}

#[tokio::test]
async fn memory_store_refuses_when_full_of_kept_requests() {
    let store = MemoryDeletionStore::with_capacity(2);
    assert_eq!(store.capacity(), 2);
    let a = store.record(facebook(), "a", t0()).await.unwrap();
    let b = store
        .record(facebook(), "b", t0() + Duration::from_secs(1))
        .await
        .unwrap();
    let almost = a.expires_at() - Duration::from_secs(1);

    let err = store.record(facebook(), "c", almost).await.unwrap_err();
    assert_eq!(err.code(), "deletion_store_full", "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(store.len(), 2, "nothing dropped, nothing added");
    assert_eq!(store.get(&a.code, almost).await.unwrap(), Some(a.clone()));
    assert_eq!(store.get(&b.code, almost).await.unwrap(), Some(b.clone()));
    // A retried callback still finds its request in a full store.
    assert_eq!(store.record(facebook(), "a", almost).await.unwrap(), a);
    assert!(
        store
            .complete(&b.code, DeletionOutcome::NothingFound, almost)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn memory_store_makes_room_by_dropping_expired_requests() {
    let store = MemoryDeletionStore::with_capacity(2);
    let a = store.record(facebook(), "a", t0()).await.unwrap();
    let b = store
        .record(facebook(), "b", t0() + Duration::from_secs(1))
        .await
        .unwrap();
    // `a` is past retention, `b` is not: `c` takes `a`'s place.
    let at = a.expires_at();
    let c = store.record(facebook(), "c", at).await.unwrap();
    assert_eq!(store.len(), 2);
    assert_eq!(store.get(&a.code, at).await.unwrap(), None);
    assert_eq!(store.get(&b.code, at).await.unwrap(), Some(b));
    assert_eq!(store.get(&c.code, at).await.unwrap(), Some(c));
    assert!(
        store.record(facebook(), "d", at).await.is_err(),
        "full again"
    );

    // Everything expired: the whole store is free.
    let much_later = at + RETENTION * 2;
    for subject in ["d", "e"] {
        store.record(facebook(), subject, much_later).await.unwrap();
    }
    assert_eq!(store.len(), 2);
    assert_eq!(MemoryDeletionStore::with_capacity(0).capacity(), 1);
    assert_eq!(MemoryDeletionStore::new().capacity(), 100_000);
}

/// What the suite's `Debug` check relies on: the memory store does show what it holds,
/// each subject as its hash.
#[tokio::test]
async fn memory_store_shows_subjects_as_hashes_only() {
    let store = MemoryDeletionStore::new();
    let request = store.record(facebook(), "10158872345", t0()).await.unwrap();
    let shown = format!("{store:?}");
    let hash = format!("{:?}", SubjectHash::of(&facebook(), "10158872345"));
    assert!(shown.contains(&hash), "{shown}");
    assert!(shown.contains(request.code.as_str()), "{shown}");
    assert!(!shown.contains("10158872345"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_keep_no_subject_in_clear() {
    let Some((schema, store)) = pg_store().await else {
        return;
    };
    let subject = "10158872345";
    let request = store.record(facebook(), subject, t0()).await.unwrap();
    store
        .complete(&request.code, DeletionOutcome::IdentityRemoved, t0())
        .await
        .unwrap();
    let rows: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT r::text, subject_hash FROM data_deletion_requests r")
            .fetch_all(schema.pool())
            .await
            .unwrap();
    assert_eq!(rows.len(), 1);
    let (row, hash) = &rows[0];
    assert!(
        !row.contains(subject),
        "the subject is stored in clear: {row}"
    );
    assert!(row.contains(request.code.as_str()) && row.contains("identity_removed"));
    assert_eq!(
        hash.as_slice(),
        SubjectHash::of(&facebook(), subject).as_bytes(),
        "the SHA-256 of provider NUL subject"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_purges_expired_rows_as_it_records() {
    let Some((schema, store)) = pg_store().await else {
        return;
    };
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM data_deletion_requests")
            .fetch_one(schema.pool())
            .await
            .unwrap()
    };
    for i in 0..5 {
        store
            .record(facebook(), &format!("old-{i}"), t0())
            .await
            .unwrap();
    }
    let kept = store
        .record(facebook(), "kept", t0() + RETENTION / 2)
        .await
        .unwrap();
    assert_eq!(count().await, 6);
    // A lookup forgets an expired row but does not delete it; a record does.
    let later = t0() + RETENTION;
    let fresh = store.record(facebook(), "fresh", later).await.unwrap();
    assert_eq!(count().await, 2, "the five expired rows are gone");
    assert!(store.get(&kept.code, later).await.unwrap().is_some());
    assert!(store.get(&fresh.code, later).await.unwrap().is_some());
}

/// More expired rows than one record purges (100, oldest first): the subject's own
/// expired row, left by the purge, is replaced by its new request in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replaces_an_expired_row_the_purge_left() {
    let Some((schema, store)) = pg_store().await else {
        return;
    };
    for i in 0..150 {
        store
            .record(facebook(), &format!("old-{i}"), t0())
            .await
            .unwrap();
    }
    let first = store
        .record(facebook(), "again", t0() + Duration::from_secs(1))
        .await
        .unwrap();
    store
        .complete(&first.code, DeletionOutcome::IdentityRemoved, t0())
        .await
        .unwrap();
    let later = first.expires_at() + Duration::from_secs(1);
    let again = store.record(facebook(), "again", later).await.unwrap();
    assert_ne!(again.code, first.code, "a new request");
    assert_eq!((again.outcome, again.completed_at), (None, None));
    assert_eq!(again.requested_at, later);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM data_deletion_requests")
        .fetch_one(schema.pool())
        .await
        .unwrap();
    assert_eq!(
        left, 51,
        "100 purged, 50 left to a later record, and the new one"
    );
    assert_eq!(store.get(&first.code, later).await.unwrap(), None);
    assert_eq!(store.get(&again.code, later).await.unwrap(), Some(again));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_table_holds_only_what_the_store_writes() {
    let Some((schema, store)) = pg_store().await else {
        return;
    };
    let request = store.record(facebook(), "1", t0()).await.unwrap();
    let hash = SubjectHash::of(&facebook(), "1");
    let insert = |code: &str, hash: Vec<u8>, status: &str, outcome: Option<&str>| {
        sqlx::query(
            "INSERT INTO data_deletion_requests (code, provider, subject_hash, status, outcome, requested_at) \
             VALUES ($1, 'facebook', $2, $3, $4, now())",
        )
        .bind(code.to_owned())
        .bind(hash)
        .bind(status.to_owned())
        .bind(outcome.map(str::to_owned))
        .execute(schema.pool())
    };
    let other = ConfirmationCode::generate().unwrap();
    let other_hash = SubjectHash::of(&facebook(), "2").as_bytes().to_vec();
    for (what, result) in [
        (
            "one row per subject",
            insert(other.as_str(), hash.as_bytes().to_vec(), "pending", None).await,
        ),
        (
            "a 32-byte hash",
            insert(other.as_str(), vec![1, 2, 3], "pending", None).await,
        ),
        (
            "a code of the generated shape",
            insert("short", other_hash.clone(), "pending", None).await,
        ),
        (
            "a known status",
            insert(other.as_str(), other_hash.clone(), "done", None).await,
        ),
        (
            "completed with an outcome and a time",
            insert(
                other.as_str(),
                other_hash.clone(),
                "completed",
                Some("nothing_found"),
            )
            .await,
        ),
    ] {
        assert!(result.is_err(), "the table requires {what}");
    }

    // A provider name this crate would not write: corrupt, not retryable.
    sqlx::query("UPDATE data_deletion_requests SET provider = 'Not A Provider' WHERE code = $1")
        .bind(request.code.as_str())
        .execute(schema.pool())
        .await
        .unwrap();
    let err = store.get(&request.code, t0()).await.unwrap_err();
    assert_eq!(err.code(), "internal_error", "{err:?}");
    assert!(!err.is_retryable());
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
    let store = PgDeletionStore::new(MeteredPool::new(pool));
    let request = store.record(facebook(), "outage", t0()).await.unwrap();

    proxy.cut();
    let started = std::time::Instant::now();
    let err = store.record(facebook(), "outage", t0()).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(err.code(), "deletion_store_unavailable");
    assert!(
        store
            .get(&request.code, t0())
            .await
            .unwrap_err()
            .is_retryable()
    );
    let completing = store
        .complete(&request.code, DeletionOutcome::NothingFound, t0())
        .await;
    assert!(completing.unwrap_err().is_retryable());
    assert!(started.elapsed() < Duration::from_secs(5), "no call hangs");

    proxy.restore();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store.record(facebook(), "outage", t0()).await {
            Ok(again) => {
                assert_eq!(again.code, request.code);
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
