//! [`PgDeletionStore`]: data-deletion requests in Postgres (`data_deletion_requests`).

use std::time::SystemTime;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::types::time::{Date, OffsetDateTime, Time};
use upcoach_core::postgres::MeteredPool;

use super::{
    ConfirmationCode, DeletionError, DeletionOutcome, DeletionRequest, DeletionStatus,
    DeletionStore, RETENTION, SubjectHash, check_subject,
};
use crate::ProviderId;
use crate::refresh::to_micros;

const BACKEND: &str = "postgres";

/// Expired rows removed by one [`DeletionStore::record`], at most. Each request expires
/// once, so this keeps up with any rate of new requests.
const PURGE_BATCH: i64 = 100;

/// The columns of a [`DeletionRequest`].
macro_rules! columns {
    () => {
        "code, provider, status, outcome, requested_at, completed_at"
    };
}

/// Data-deletion requests in Postgres, shared by every process of a deployment: table
/// `data_deletion_requests` of the project's migrations
/// ([`upcoach_core::postgres::migrate`], which the host runs first).
///
/// - A row per request, keyed by its code; the person is kept only as `subject_hash`
///   (32 bytes, never the subject), which is unique. A record is one
///   `INSERT … ON CONFLICT (subject_hash) DO UPDATE`: of concurrent records of one
///   subject, one inserts and the others find its row; a row past retention is replaced
///   by the new request in the same statement. No record ever waits for another but on
///   that one row.
/// - Rows past retention are never answered and are purged as requests are recorded:
///   each record first deletes up to 100 of the oldest (skipping rows other calls hold),
///   so no separate job is needed.
/// - Completing is one conditional `UPDATE … WHERE status = 'pending'`, so the first of
///   concurrent completions wins and the others return it.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::SystemTime;
/// use upcoach_auth::deletion::{DeletionStore, PgDeletionStore};
///
/// let pool = upcoach_core::postgres::MeteredPool::new(
///     sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?,
/// );
/// upcoach_core::postgres::migrate(pool.inner()).await?;
/// let store = PgDeletionStore::new(pool.clone());
/// let request = store.record("facebook".parse()?, "10158872345", SystemTime::now()).await?;
/// println!("{}", request.code);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgDeletionStore {
    pool: MeteredPool,
}

impl PgDeletionStore {
    /// A store on `pool` (migrated already).
    ///
    /// `pool` is shared with the other stores, so that its count of waiting tasks covers
    /// them all.
    pub fn new(pool: MeteredPool) -> Self {
        Self { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &MeteredPool {
        &self.pool
    }
}

fn backend(e: sqlx::Error) -> DeletionError {
    DeletionError::Backend {
        backend: BACKEND,
        source: Box::new(e),
    }
}

/// `t` as `timestamptz`, clamped to what `time` can hold (years -9999 to 9999).
fn timestamp(t: SystemTime) -> OffsetDateTime {
    let nanos = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => i128::try_from(e.duration().as_nanos()).map_or(i128::MIN, |n| -n),
    };
    OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or_else(|_| {
        let end = if nanos > 0 { Date::MAX } else { Date::MIN };
        OffsetDateTime::new_utc(end, Time::MIDNIGHT)
    })
}

/// The latest `requested_at` that is past retention at `now`: a row is kept while its
/// `requested_at` is later (as [`DeletionRequest::is_expired`] decides).
fn cutoff(now: SystemTime) -> OffsetDateTime {
    let now = to_micros(now);
    timestamp(now.checked_sub(RETENTION).unwrap_or(SystemTime::UNIX_EPOCH))
}

fn get<'r, T>(row: &'r PgRow, column: &str) -> Result<T, DeletionError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(column).map_err(backend)
}

fn decode(row: &PgRow) -> Result<DeletionRequest, DeletionError> {
    let corrupt = |reason| DeletionError::Corrupt { reason };
    let code = ConfirmationCode::parse(&get::<String>(row, "code")?)
        .ok_or_else(|| corrupt("a stored confirmation code is malformed"))?;
    let provider = get::<String>(row, "provider")?
        .parse::<ProviderId>()
        .map_err(|_| corrupt("a stored request has an invalid provider name"))?;
    let status = DeletionStatus::from_name(&get::<String>(row, "status")?)
        .ok_or_else(|| corrupt("a stored request has an unknown status"))?;
    let outcome = get::<Option<String>>(row, "outcome")?
        .map(|name| {
            DeletionOutcome::from_name(&name)
                .ok_or_else(|| corrupt("a stored request has an unknown outcome"))
        })
        .transpose()?;
    Ok(DeletionRequest {
        code,
        provider,
        status,
        outcome,
        requested_at: get::<OffsetDateTime>(row, "requested_at")?.into(),
        completed_at: get::<Option<OffsetDateTime>>(row, "completed_at")?.map(Into::into),
    })
}

#[async_trait]
impl DeletionStore for PgDeletionStore {
    async fn record(
        &self,
        provider: ProviderId,
        subject: &str,
        now: SystemTime,
    ) -> Result<DeletionRequest, DeletionError> {
        check_subject(subject)?;
        let hash = SubjectHash::of(&provider, subject);
        let code = ConfirmationCode::generate()?;
        let cutoff = cutoff(now);
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        // The oldest expired rows, never waiting for one another call holds.
        sqlx::query(
            "DELETE FROM data_deletion_requests WHERE code IN ( \
               SELECT code FROM data_deletion_requests WHERE requested_at <= $1 \
               ORDER BY requested_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(cutoff)
        .bind(PURGE_BATCH)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
        // A new request, or the subject's row: kept as it is while retained, replaced
        // by the new request once past retention.
        let row = sqlx::query(concat!(
            "INSERT INTO data_deletion_requests AS r \
               (code, provider, subject_hash, status, outcome, requested_at, completed_at) \
             VALUES ($1, $2, $3, 'pending', NULL, $4, NULL) \
             ON CONFLICT (subject_hash) DO UPDATE SET \
               code = CASE WHEN r.requested_at <= $5 THEN EXCLUDED.code ELSE r.code END, \
               provider = CASE WHEN r.requested_at <= $5 THEN EXCLUDED.provider ELSE r.provider END, \
               status = CASE WHEN r.requested_at <= $5 THEN EXCLUDED.status ELSE r.status END, \
               outcome = CASE WHEN r.requested_at <= $5 THEN EXCLUDED.outcome ELSE r.outcome END, \
               requested_at = CASE WHEN r.requested_at <= $5 THEN EXCLUDED.requested_at \
                                   ELSE r.requested_at END, \
               completed_at = CASE WHEN r.requested_at <= $5 THEN EXCLUDED.completed_at \
                                   ELSE r.completed_at END \
             RETURNING ",
            columns!()
        ))
        .bind(code.as_str())
        .bind(provider.as_str())
        .bind(&hash.as_bytes()[..])
        .bind(timestamp(to_micros(now)))
        .bind(cutoff)
        .fetch_one(&mut *conn)
        .await
        .map_err(backend)?;
        decode(&row)
    }

    async fn complete(
        &self,
        code: &ConfirmationCode,
        outcome: DeletionOutcome,
        now: SystemTime,
    ) -> Result<Option<DeletionRequest>, DeletionError> {
        let cutoff = cutoff(now);
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let completed = sqlx::query(concat!(
            "UPDATE data_deletion_requests \
             SET status = 'completed', outcome = $2, completed_at = $3 \
             WHERE code = $1 AND status = 'pending' AND requested_at > $4 \
             RETURNING ",
            columns!()
        ))
        .bind(code.as_str())
        .bind(outcome.as_str())
        .bind(timestamp(to_micros(now)))
        .bind(cutoff)
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend)?;
        if let Some(row) = completed {
            return decode(&row).map(Some);
        }
        // Completed before (a statement of its own sees that completion), or unknown.
        sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM data_deletion_requests WHERE code = $1 AND requested_at > $2"
        ))
        .bind(code.as_str())
        .bind(cutoff)
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend)?
        .as_ref()
        .map(decode)
        .transpose()
    }

    async fn get(
        &self,
        code: &ConfirmationCode,
        now: SystemTime,
    ) -> Result<Option<DeletionRequest>, DeletionError> {
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM data_deletion_requests WHERE code = $1 AND requested_at > $2"
        ))
        .bind(code.as_str())
        .bind(cutoff(now))
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend)?
        .as_ref()
        .map(decode)
        .transpose()
    }
}
