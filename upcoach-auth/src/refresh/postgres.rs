//! [`PgRefreshStore`]: refresh-token families in Postgres (`refresh_families`,
//! `refresh_tokens`).

use std::time::SystemTime;

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::types::time::{Date, OffsetDateTime, Time};
use sqlx::{Connection, PgConnection, Row};
use upcoach_core::postgres::MeteredPool;
use upcoach_core::{SessionId, UserId};
use uuid::Uuid;

use super::{
    DeviceFingerprint, IssuedRefresh, Observed, Purged, RefreshError, RefreshFamily, RefreshPolicy,
    RefreshStore, RefreshToken, RevokeReason, Rotation, TokenHash, Verdict, decide, is_expired,
    later, to_micros,
};

const BACKEND: &str = "postgres";
/// Rows removed by one statement of [`RefreshStore::purge_expired`].
const PURGE_BATCH: i64 = 5_000;

/// Refresh-token families in Postgres, shared by every process of a deployment.
///
/// Needs the project's migrations ([`upcoach_core::postgres::migrate`]). Tokens are
/// stored as their SHA-256 only; a family's device as its [`DeviceFingerprint`]
/// (`refresh_families.device_fingerprint`, `NULL` for a family that is not bound,
/// which every family from before that column is).
///
/// How it stays right under concurrency (READ COMMITTED):
/// - A rotation runs in one transaction that first locks its family's row in
///   `refresh_families` (`FOR UPDATE`), then exchanges the token with one conditional
///   statement (`UPDATE refresh_tokens SET rotated_at … WHERE token_hash = $1 AND
///   rotated_at IS NULL AND revoked_at IS NULL AND …` feeding the child's `INSERT`). Of
///   concurrent rotations of one token exactly one matches; the others then find the
///   token exchanged and are grace retries or reuse.
/// - A revocation updates that same family row, so it waits for a rotation in flight
///   and any later rotation waits for it and sees it: once `revoke_*` returns, no token
///   of the family can rotate.
/// - The lock also reads the family's device, so the device check costs no round trip;
///   a mismatch revokes the family under that lock.
/// - A rotation costs four round trips (`BEGIN`, lock, exchange, `COMMIT`); rotations of
///   different families never wait for each other.
///
/// ```no_run
/// use std::time::{Duration, SystemTime};
/// use upcoach_auth::refresh::{PgRefreshStore, RefreshPolicy, RefreshStore};
/// use upcoach_core::UserId;
///
/// # async fn demo(user: UserId) -> Result<(), Box<dyn std::error::Error>> {
/// let pool = upcoach_core::postgres::MeteredPool::new(
///     sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?,
/// );
/// upcoach_core::postgres::migrate(pool.inner()).await?;
/// let store = PgRefreshStore::new(pool.clone())
///     .with_policy(RefreshPolicy::default().with_grace(Duration::from_secs(10)));
/// let issued = store.open_family(user, None, SystemTime::now()).await?;
/// let rotation = store.rotate(issued.token.expose(), None, SystemTime::now()).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgRefreshStore {
    pool: MeteredPool,
    policy: RefreshPolicy,
}

impl PgRefreshStore {
    /// A store on `pool` (shared with the other stores) with the default
    /// [`RefreshPolicy`].
    pub fn new(pool: MeteredPool) -> Self {
        Self {
            pool,
            policy: RefreshPolicy::default(),
        }
    }

    /// Applies `policy` instead of the default.
    pub fn with_policy(mut self, policy: RefreshPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The pool.
    pub fn pool(&self) -> &MeteredPool {
        &self.pool
    }
}

fn backend(e: sqlx::Error) -> RefreshError {
    RefreshError::Backend {
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

fn get<'r, T>(row: &'r PgRow, column: &str) -> Result<T, RefreshError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(column).map_err(backend)
}

fn time_of(row: &PgRow, column: &str) -> Result<SystemTime, RefreshError> {
    Ok(get::<OffsetDateTime>(row, column)?.into())
}

fn fingerprint_of(row: &PgRow, column: &str) -> Result<Option<DeviceFingerprint>, RefreshError> {
    get::<Option<Vec<u8>>>(row, column)?
        .map(|bytes| {
            <[u8; 32]>::try_from(bytes.as_slice())
                .map(DeviceFingerprint::from_bytes)
                .map_err(|_| RefreshError::Backend {
                    backend: BACKEND,
                    source: "a device fingerprint is not 32 bytes".into(),
                })
        })
        .transpose()
}

/// Revokes `family` inside `conn`'s transaction: the family row first (which waits for
/// a rotation holding it), then, in a statement of its own so that it sees every token
/// committed meanwhile, the tokens. `true` if this call revoked it.
async fn revoke_in(
    conn: &mut PgConnection,
    family: Uuid,
    reason: RevokeReason,
    now: OffsetDateTime,
) -> Result<bool, RefreshError> {
    let revoked = sqlx::query(
        "UPDATE refresh_families SET revoked_at = $2, revoke_reason = $3 \
         WHERE family_id = $1 AND revoked_at IS NULL",
    )
    .bind(family)
    .bind(now)
    .bind(reason.as_str())
    .execute(&mut *conn)
    .await
    .map_err(backend)?
    .rows_affected()
        == 1;
    if revoked {
        sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = $2 \
             WHERE family_id = $1 AND revoked_at IS NULL",
        )
        .bind(family)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    }
    Ok(revoked)
}

#[async_trait]
impl RefreshStore for PgRefreshStore {
    fn policy(&self) -> &RefreshPolicy {
        &self.policy
    }

    async fn open_family(
        &self,
        user: UserId,
        device: Option<DeviceFingerprint>,
        now: SystemTime,
    ) -> Result<IssuedRefresh, RefreshError> {
        let now = to_micros(now);
        let token = RefreshToken::generate()?;
        let family_id = SessionId::new();
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let (expires_at, family_expires_at) = self.policy.first_expiries(now);
        let result = sqlx::query(
            "WITH family AS ( \
               INSERT INTO refresh_families \
                 (family_id, user_id, created_at, expires_at, device_fingerprint) \
               VALUES ($1, $2, $3, $4, $7) \
             ) \
             INSERT INTO refresh_tokens \
               (token_hash, family_id, parent_hash, user_id, issued_at, expires_at, family_expires_at) \
             VALUES ($5, $1, NULL, $2, $3, $6, $4)",
        )
        .bind(family_id.as_uuid())
        .bind(user.as_uuid())
        .bind(timestamp(now))
        .bind(timestamp(family_expires_at))
        .bind(&token.hash().as_bytes()[..])
        .bind(timestamp(expires_at))
        .bind(device.as_ref().map(|d| &d.as_bytes()[..]))
        .execute(&mut *conn)
        .await;
        match result {
            Ok(_) => Ok(IssuedRefresh {
                token,
                family_id,
                expires_at,
                family_expires_at,
            }),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23503") => {
                Err(RefreshError::UnknownUser)
            }
            Err(e) => Err(backend(e)),
        }
    }

    async fn rotate(
        &self,
        presented: &str,
        device: Option<DeviceFingerprint>,
        now: SystemTime,
    ) -> Result<Rotation, RefreshError> {
        if !RefreshToken::is_well_formed(presented) {
            return Err(RefreshError::Invalid);
        }
        let now = to_micros(now);
        let at = timestamp(now);
        let hash = TokenHash::of(presented);
        let hash = &hash.as_bytes()[..];
        let child = RefreshToken::generate()?;
        let child_hash = child.hash();
        let child_expires = timestamp(to_micros(later(now, self.policy.token_ttl)));

        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let mut tx = conn.begin().await.map_err(backend)?;
        // Serialize with every other change of the family (rotations and revocations).
        let Some(locked) = sqlx::query(
            "SELECT f.family_id, f.user_id, f.expires_at AS family_expires_at, \
               f.device_fingerprint, t.expires_at \
             FROM refresh_tokens t \
             JOIN refresh_families f ON f.family_id = t.family_id \
             WHERE t.token_hash = $1 FOR UPDATE OF f",
        )
        .bind(hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?
        else {
            return Err(RefreshError::Invalid);
        };

        // The device, after expiry (an expired token changes nothing): another device
        // revokes the family, whatever state the token is in.
        let expired = is_expired(
            time_of(&locked, "expires_at")?,
            time_of(&locked, "family_expires_at")?,
            now,
        );
        let bound = fingerprint_of(&locked, "device_fingerprint")?;
        if !expired && !DeviceFingerprint::accepts(bound.as_ref(), device.as_ref()) {
            let family_id: Uuid = get(&locked, "family_id")?;
            let user_id: Uuid = get(&locked, "user_id")?;
            revoke_in(&mut tx, family_id, RevokeReason::DeviceMismatch, at).await?;
            tx.commit().await.map_err(backend)?;
            return Err(RefreshError::DeviceMismatch {
                user_id: UserId::from_uuid(user_id),
                family_id: SessionId::from_uuid(family_id),
            });
        }

        // The exchange: only an unused, unrevoked, unexpired token of a live family
        // none of whose siblings was used matches.
        let rotated = sqlx::query(
            "WITH rotated AS ( \
               UPDATE refresh_tokens t SET rotated_at = $2 \
               WHERE t.token_hash = $1 \
                 AND t.rotated_at IS NULL AND t.revoked_at IS NULL AND t.expires_at > $2 \
                 AND EXISTS (SELECT 1 FROM refresh_families f WHERE f.family_id = t.family_id \
                             AND f.revoked_at IS NULL AND f.expires_at > $2) \
                 AND NOT EXISTS (SELECT 1 FROM refresh_tokens s WHERE s.parent_hash = t.parent_hash \
                                 AND s.rotated_at IS NOT NULL) \
               RETURNING t.family_id, t.user_id, t.family_expires_at \
             ) \
             INSERT INTO refresh_tokens \
               (token_hash, family_id, parent_hash, user_id, issued_at, expires_at, family_expires_at) \
             SELECT $3, family_id, $1, user_id, $2, LEAST($4, family_expires_at), family_expires_at \
             FROM rotated \
             RETURNING family_id, user_id, expires_at",
        )
        .bind(hash)
        .bind(at)
        .bind(&child_hash.as_bytes()[..])
        .bind(child_expires)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        if let Some(row) = rotated {
            let rotation = Rotation {
                user_id: UserId::from_uuid(get(&row, "user_id")?),
                family_id: SessionId::from_uuid(get(&row, "family_id")?),
                token: child,
                expires_at: time_of(&row, "expires_at")?,
                grace_retry: false,
            };
            tx.commit().await.map_err(backend)?;
            return Ok(rotation);
        }

        // Not exchanged: find out why, still holding the family's lock.
        let row = sqlx::query(
            "SELECT t.family_id, t.user_id, t.expires_at, t.rotated_at, \
               (t.revoked_at IS NOT NULL OR f.revoked_at IS NOT NULL) AS revoked, \
               f.expires_at AS family_expires_at, \
               EXISTS (SELECT 1 FROM refresh_tokens c WHERE c.parent_hash = t.token_hash \
                       AND c.rotated_at IS NOT NULL) AS child_rotated, \
               EXISTS (SELECT 1 FROM refresh_tokens s WHERE s.parent_hash = t.parent_hash \
                       AND s.token_hash <> t.token_hash AND s.rotated_at IS NOT NULL) AS sibling_rotated \
             FROM refresh_tokens t JOIN refresh_families f ON f.family_id = t.family_id \
             WHERE t.token_hash = $1",
        )
        .bind(hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?
        .ok_or(RefreshError::Invalid)?;
        let family_id: Uuid = get(&row, "family_id")?;
        let user_id: Uuid = get(&row, "user_id")?;
        let family_expires_at = time_of(&row, "family_expires_at")?;
        let observed = Observed {
            expires_at: time_of(&row, "expires_at")?,
            family_expires_at,
            rotated_at: get::<Option<OffsetDateTime>>(&row, "rotated_at")?.map(Into::into),
            revoked: get(&row, "revoked")?,
            // Checked above, under the same lock.
            device_accepted: true,
            child_rotated: get(&row, "child_rotated")?,
            sibling_rotated: get(&row, "sibling_rotated")?,
        };
        match decide(&observed, &self.policy, now) {
            Verdict::GraceRetry => {
                let expires_at =
                    to_micros(later(now, self.policy.token_ttl)).min(family_expires_at);
                sqlx::query(
                    "INSERT INTO refresh_tokens \
                       (token_hash, family_id, parent_hash, user_id, issued_at, expires_at, family_expires_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&child_hash.as_bytes()[..])
                .bind(family_id)
                .bind(hash)
                .bind(user_id)
                .bind(at)
                .bind(timestamp(expires_at))
                .bind(timestamp(family_expires_at))
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
                tx.commit().await.map_err(backend)?;
                Ok(Rotation {
                    user_id: UserId::from_uuid(user_id),
                    family_id: SessionId::from_uuid(family_id),
                    token: child,
                    expires_at,
                    grace_retry: true,
                })
            }
            Verdict::Reuse => {
                revoke_in(&mut tx, family_id, RevokeReason::Reuse, at).await?;
                tx.commit().await.map_err(backend)?;
                Err(RefreshError::Reused {
                    user_id: UserId::from_uuid(user_id),
                    family_id: SessionId::from_uuid(family_id),
                })
            }
            Verdict::Revoked => Err(RefreshError::Revoked),
            Verdict::Expired => Err(RefreshError::Expired),
            // The exchange above matches exactly these tokens, and the device was
            // checked, under the same lock.
            Verdict::Rotate | Verdict::DeviceMismatch => Err(RefreshError::Backend {
                backend: BACKEND,
                source: "the token was rotatable but the exchange did not match it".into(),
            }),
        }
    }

    async fn revoke_family(
        &self,
        family: SessionId,
        reason: RevokeReason,
        now: SystemTime,
    ) -> Result<bool, RefreshError> {
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let mut tx = conn.begin().await.map_err(backend)?;
        let revoked =
            revoke_in(&mut tx, family.as_uuid(), reason, timestamp(to_micros(now))).await?;
        tx.commit().await.map_err(backend)?;
        Ok(revoked)
    }

    async fn revoke_presented(
        &self,
        presented: &str,
        owner: UserId,
        now: SystemTime,
    ) -> Result<Option<RefreshFamily>, RefreshError> {
        if !RefreshToken::is_well_formed(presented) {
            return Ok(None);
        }
        let hash = TokenHash::of(presented);
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let mut tx = conn.begin().await.map_err(backend)?;
        let Some(row) =
            sqlx::query("SELECT family_id, user_id FROM refresh_tokens WHERE token_hash = $1")
                .bind(&hash.as_bytes()[..])
                .fetch_optional(&mut *tx)
                .await
                .map_err(backend)?
        else {
            return Ok(None);
        };
        let family_id: Uuid = get(&row, "family_id")?;
        let user_id: Uuid = get(&row, "user_id")?;
        if UserId::from_uuid(user_id) != owner {
            // Dropping the transaction rolls it back: nothing changed.
            return Err(RefreshError::NotOwner);
        }
        revoke_in(
            &mut tx,
            family_id,
            RevokeReason::Logout,
            timestamp(to_micros(now)),
        )
        .await?;
        tx.commit().await.map_err(backend)?;
        Ok(Some(RefreshFamily {
            family_id: SessionId::from_uuid(family_id),
            user_id: UserId::from_uuid(user_id),
        }))
    }

    async fn revoke_user(&self, user: UserId, now: SystemTime) -> Result<u64, RefreshError> {
        let at = timestamp(to_micros(now));
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let mut tx = conn.begin().await.map_err(backend)?;
        // Locked in one order, so two of these for one user cannot deadlock.
        let families: Vec<Uuid> = sqlx::query(
            "UPDATE refresh_families SET revoked_at = $2, revoke_reason = $3 \
             WHERE family_id IN (SELECT family_id FROM refresh_families \
                                 WHERE user_id = $1 AND revoked_at IS NULL \
                                 ORDER BY family_id FOR UPDATE) \
               AND revoked_at IS NULL \
             RETURNING family_id",
        )
        .bind(user.as_uuid())
        .bind(at)
        .bind(RevokeReason::AllSessions.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(backend)?
        .iter()
        .map(|row| get(row, "family_id"))
        .collect::<Result<_, _>>()?;
        if !families.is_empty() {
            sqlx::query(
                "UPDATE refresh_tokens SET revoked_at = $2 \
                 WHERE family_id = ANY($1) AND revoked_at IS NULL",
            )
            .bind(&families)
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(families.len() as u64)
    }

    async fn purge_expired(&self, now: SystemTime) -> Result<Purged, RefreshError> {
        let now = to_micros(now);
        let mut purged = Purged::default();
        // Whole families past their end, with their tokens. Rows a rotation or
        // revocation holds are skipped, never waited for; a later purge takes them.
        // A connection per batch, so requests waiting for one get a turn in between.
        loop {
            let mut conn = self.pool.acquire().await.map_err(backend)?;
            let row = sqlx::query(
                "WITH doomed AS ( \
                   SELECT family_id FROM refresh_families WHERE expires_at <= $1 \
                   ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED \
                 ), tokens AS ( \
                   DELETE FROM refresh_tokens t USING doomed d WHERE t.family_id = d.family_id \
                   RETURNING 1 \
                 ), families AS ( \
                   DELETE FROM refresh_families f USING doomed d WHERE f.family_id = d.family_id \
                   RETURNING 1 \
                 ) \
                 SELECT (SELECT count(*) FROM families) AS families, \
                        (SELECT count(*) FROM tokens) AS tokens",
            )
            .bind(timestamp(now))
            .bind(PURGE_BATCH)
            .fetch_one(&mut *conn)
            .await
            .map_err(backend)?;
            let families: i64 = get(&row, "families")?;
            purged.families += families as u64;
            purged.tokens += get::<i64>(&row, "tokens")? as u64;
            if families < PURGE_BATCH {
                break;
            }
        }
        // Tokens past their expiry plus the grace (the sibling checks of tokens issued
        // within the grace of each other need them until then).
        let cutoff = now
            .checked_sub(self.policy.grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        loop {
            let mut conn = self.pool.acquire().await.map_err(backend)?;
            let deleted = sqlx::query(
                "DELETE FROM refresh_tokens WHERE token_hash IN ( \
                   SELECT token_hash FROM refresh_tokens WHERE expires_at <= $1 \
                   LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(timestamp(cutoff))
            .bind(PURGE_BATCH)
            .execute(&mut *conn)
            .await
            .map_err(backend)?
            .rows_affected();
            purged.tokens += deleted;
            if deleted < PURGE_BATCH as u64 {
                break;
            }
        }
        Ok(purged)
    }
}
