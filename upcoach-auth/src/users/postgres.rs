//! [`PgUserStore`]: users in Postgres (`users`, `user_identities`).

use async_trait::async_trait;
use sqlx::postgres::{PgExecutor, PgRow};
use sqlx::{Connection, Postgres, Row, Transaction};
use upcoach_core::postgres::MeteredPool;
use upcoach_core::{Role, UserId};
use uuid::Uuid;

use super::{
    Erased, Holder, LinkingPolicy, SignIn, User, UserError, UserStore, check_identity, dedup_roles,
    email_of, first_sign_in_choice,
};
use crate::deletion::SubjectHash;
use crate::{ProviderId, VerifiedIdentity};

const BACKEND: &str = "postgres";

/// How many times a call starts over after losing a race to a concurrent one.
const ATTEMPTS: usize = 5;

/// The class of the advisory locks that serialize first sign-ins per e-mail address
/// (the other half of the key is the address's hash); "upcu" in ASCII.
const ADDRESS_LOCK_CLASS: i32 = 0x7570_6375;

/// The unique index that allows one identity per provider per user.
const USER_PROVIDER_KEY: &str = "user_identities_user_provider_key";

/// The columns of a [`User`], from `users u`.
macro_rules! user_columns {
    () => {
        "u.id, u.email, u.email_verified, u.name, u.roles, \
         ARRAY(SELECT p.provider FROM user_identities p WHERE p.user_id = u.id \
               ORDER BY p.linked_at, p.provider) AS providers"
    };
}

fn backend(e: sqlx::Error) -> UserError {
    UserError::Backend {
        backend: BACKEND,
        source: Box::new(e),
    }
}

fn violates(e: &sqlx::Error, constraint: &str) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation() && d.constraint() == Some(constraint))
}

/// A user store in Postgres: tables `users` and `user_identities` of the project's
/// migrations (`upcoach_core::postgres::migrate`, which the host runs first).
///
/// - Identities are unique by (provider, subject) and by (user, provider) in the
///   database, so no race can link one identity twice or give a user two identities of
///   one provider.
/// - A first sign-in runs in one transaction under an advisory lock on its e-mail
///   address, so two first sign-ins with one address (two providers, or one identity
///   twice) are decided one after the other: one user, the other linked or refused. One
///   that loses the race for its identity starts over and finds the identity.
/// - Link and unlink lock the user's row, so two concurrent unlinks can never remove a
///   user's last two identities.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use upcoach_auth::users::{PgUserStore, UserStore};
///
/// let pool = upcoach_core::postgres::MeteredPool::new(
///     sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?,
/// );
/// upcoach_core::postgres::migrate(pool.inner()).await?;
/// let store = PgUserStore::new(pool.clone());
/// assert!(store.get(upcoach_core::UserId::new()).await?.is_none());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgUserStore {
    pool: MeteredPool,
}

impl PgUserStore {
    /// A store on `pool` (migrated already).
    ///
    /// `pool` is shared with the other stores, so that its count of waiting tasks covers
    /// them all.
    pub fn new(pool: MeteredPool) -> Self {
        Self { pool }
    }

    /// A known identity's user, after refreshing the identity's stored address.
    async fn known(
        &self,
        identity: &VerifiedIdentity,
        email: Option<&str>,
        verified: bool,
    ) -> Result<Option<User>, UserError> {
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let row = sqlx::query(concat!(
            "SELECT i.email AS identity_email, i.email_verified AS identity_email_verified, ",
            user_columns!(),
            " FROM user_identities i JOIN users u ON u.id = i.user_id \
              WHERE i.provider = $1 AND i.subject = $2"
        ))
        .bind(identity.provider.as_str())
        .bind(&identity.subject)
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let stored_email: Option<String> = row.try_get("identity_email").map_err(backend)?;
        let stored_verified: bool = row.try_get("identity_email_verified").map_err(backend)?;
        if stored_email.as_deref() != email || stored_verified != verified {
            sqlx::query(
                "UPDATE user_identities SET email = $3, email_verified = $4 \
                 WHERE provider = $1 AND subject = $2",
            )
            .bind(identity.provider.as_str())
            .bind(&identity.subject)
            .bind(email)
            .bind(verified)
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
        }
        decode(&row).map(Some)
    }

    /// A first sign-in of `identity`, in one transaction; `None` when a concurrent call
    /// linked the identity first (start over: it is known now).
    async fn first_sign_in(
        &self,
        identity: &VerifiedIdentity,
        email: Option<&str>,
        verified: bool,
        policy: &LinkingPolicy,
    ) -> Result<Option<SignIn>, UserError> {
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let mut tx = conn.begin().await.map_err(backend)?;
        if let Some(email) = email {
            sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(lower($2)))")
                .bind(ADDRESS_LOCK_CLASS)
                .bind(email)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        if identity_owner(&mut tx, identity).await?.is_some() {
            return Ok(None);
        }

        if let Some(email) = email {
            let owners = sqlx::query(
                "SELECT u.id, \
                   EXISTS (SELECT 1 FROM user_identities i WHERE i.user_id = u.id \
                           AND lower(i.email) = lower($1) AND i.email_verified \
                           AND i.provider = ANY($4)) AS verified, \
                   EXISTS (SELECT 1 FROM user_identities i WHERE i.user_id = u.id \
                           AND i.provider = $2) AS has_provider, \
                   EXISTS (SELECT 1 FROM unlinked_identities t WHERE t.user_id = u.id \
                           AND t.subject_hash = $3) AS unlinked \
                 FROM users u \
                 WHERE lower(u.email) = lower($1) \
                    OR u.id IN (SELECT i.user_id FROM user_identities i \
                                WHERE lower(i.email) = lower($1)) \
                 ORDER BY verified DESC \
                 LIMIT 2",
            )
            .bind(email)
            .bind(identity.provider.as_str())
            .bind(subject_hash(identity.provider, &identity.subject))
            .bind(
                policy
                    .trusted()
                    .map(|p| p.as_str().to_owned())
                    .collect::<Vec<String>>(),
            )
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
            // Verified holders first: two rows tell none, one or several of them.
            let holders = owners
                .iter()
                .map(|row| {
                    Ok(Holder {
                        id: row.try_get::<Uuid, _>("id")?,
                        verified: row.try_get("verified")?,
                        has_provider: row.try_get("has_provider")?,
                        unlinked: row.try_get("unlinked")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(backend)?;
            if let Some(owner) = first_sign_in_choice(identity, policy, holders)? {
                match insert_identity(&mut tx, owner, identity, Some(email), verified).await {
                    Ok(true) => {}
                    Ok(false) => return Ok(None),
                    Err(e) if violates(&e, USER_PROVIDER_KEY) => {
                        return Err(UserError::AccountExists);
                    }
                    Err(e) => return Err(backend(e)),
                }
                let user = load(&mut *tx, owner).await?.ok_or(UserError::NotFound)?;
                tx.commit().await.map_err(backend)?;
                return Ok(Some(SignIn {
                    user,
                    created: false,
                    linked: true,
                }));
            }
        }

        let id = UserId::new().as_uuid();
        sqlx::query(
            "INSERT INTO users (id, email, email_verified, name, roles) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(email)
        .bind(verified)
        .bind(identity.name.as_deref())
        .bind(vec![Role::USER.as_str()])
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        if !insert_identity(&mut tx, id, identity, email, verified)
            .await
            .map_err(backend)?
        {
            return Ok(None);
        }
        let user = load(&mut *tx, id).await?.ok_or(UserError::NotFound)?;
        tx.commit().await.map_err(backend)?;
        Ok(Some(SignIn {
            user,
            created: true,
            linked: false,
        }))
    }

    /// One attempt at [`UserStore::link`]; `None` when a concurrent call linked the
    /// identity first (start over).
    async fn try_link(
        &self,
        user_id: Uuid,
        identity: &VerifiedIdentity,
    ) -> Result<Option<User>, UserError> {
        let email = email_of(identity);
        let verified = email.is_some() && identity.email_verified;
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let mut tx = conn.begin().await.map_err(backend)?;
        lock_user(&mut tx, user_id).await?;
        match identity_owner(&mut tx, identity).await? {
            Some(owner) if owner == user_id => {
                sqlx::query(
                    "UPDATE user_identities SET email = $3, email_verified = $4 \
                     WHERE provider = $1 AND subject = $2",
                )
                .bind(identity.provider.as_str())
                .bind(&identity.subject)
                .bind(email)
                .bind(verified)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
            }
            Some(_) => return Err(UserError::IdentityTaken),
            None => match insert_identity(&mut tx, user_id, identity, email, verified).await {
                Ok(true) => {}
                Ok(false) => return Ok(None),
                Err(e) if violates(&e, USER_PROVIDER_KEY) => {
                    return Err(UserError::ProviderAlreadyLinked {
                        provider: identity.provider,
                    });
                }
                Err(e) => return Err(backend(e)),
            },
        }
        // Linked on purpose: an earlier unlink of it no longer holds.
        sqlx::query("DELETE FROM unlinked_identities WHERE user_id = $1 AND subject_hash = $2")
            .bind(user_id)
            .bind(subject_hash(identity.provider, &identity.subject))
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        let user = load(&mut *tx, user_id).await?.ok_or(UserError::NotFound)?;
        tx.commit().await.map_err(backend)?;
        Ok(Some(user))
    }
}

/// The stored hash of `provider`'s `subject` ([`SubjectHash`]).
fn subject_hash(provider: ProviderId, subject: &str) -> Vec<u8> {
    SubjectHash::of(&provider, subject).as_bytes().to_vec()
}

/// Locks the user's row for the rest of the transaction (and marks it updated);
/// [`UserError::NotFound`] when there is no such user.
async fn lock_user(tx: &mut Transaction<'_, Postgres>, user_id: Uuid) -> Result<(), UserError> {
    sqlx::query("UPDATE users SET updated_at = now() WHERE id = $1 RETURNING id")
        .bind(user_id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(backend)?
        .map(drop)
        .ok_or(UserError::NotFound)
}

/// The user an identity is linked to, if any.
async fn identity_owner(
    tx: &mut Transaction<'_, Postgres>,
    identity: &VerifiedIdentity,
) -> Result<Option<Uuid>, UserError> {
    sqlx::query_scalar("SELECT user_id FROM user_identities WHERE provider = $1 AND subject = $2")
        .bind(identity.provider.as_str())
        .bind(&identity.subject)
        .fetch_optional(&mut **tx)
        .await
        .map_err(backend)
}

/// Inserts the identity for `user_id`; `false` when the identity exists already.
async fn insert_identity(
    tx: &mut Transaction<'_, Postgres>,
    user_id: Uuid,
    identity: &VerifiedIdentity,
    email: Option<&str>,
    verified: bool,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO user_identities (provider, subject, user_id, email, email_verified) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (provider, subject) DO NOTHING RETURNING user_id",
    )
    .bind(identity.provider.as_str())
    .bind(&identity.subject)
    .bind(user_id)
    .bind(email)
    .bind(verified)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(inserted.is_some())
}

async fn load<'e>(executor: impl PgExecutor<'e>, id: Uuid) -> Result<Option<User>, UserError> {
    sqlx::query(concat!(
        "SELECT ",
        user_columns!(),
        " FROM users u WHERE u.id = $1"
    ))
    .bind(id)
    .fetch_optional(executor)
    .await
    .map_err(backend)?
    .as_ref()
    .map(decode)
    .transpose()
}

fn decode(row: &PgRow) -> Result<User, UserError> {
    let roles: Vec<String> = row.try_get("roles").map_err(backend)?;
    let providers: Vec<String> = row.try_get("providers").map_err(backend)?;
    Ok(User {
        id: UserId::from_uuid(row.try_get("id").map_err(backend)?),
        email: row.try_get("email").map_err(backend)?,
        email_verified: row.try_get("email_verified").map_err(backend)?,
        name: row.try_get("name").map_err(backend)?,
        roles: roles
            .iter()
            .map(|r| r.parse::<Role>())
            .collect::<Result<_, _>>()
            .map_err(|_| UserError::Corrupt {
                reason: "a stored role is not a valid role name",
            })?,
        providers: providers
            .iter()
            .map(|p| p.parse::<ProviderId>())
            .collect::<Result<_, _>>()
            .map_err(|_| UserError::Corrupt {
                reason: "a stored identity has an unknown provider",
            })?,
    })
}

#[async_trait]
impl UserStore for PgUserStore {
    async fn sign_in(
        &self,
        identity: &VerifiedIdentity,
        policy: &LinkingPolicy,
    ) -> Result<SignIn, UserError> {
        check_identity(identity)?;
        let email = email_of(identity);
        let verified = email.is_some() && identity.email_verified;
        for _ in 0..ATTEMPTS {
            if let Some(user) = self.known(identity, email, verified).await? {
                return Ok(SignIn {
                    user,
                    created: false,
                    linked: false,
                });
            }
            if let Some(sign_in) = self
                .first_sign_in(identity, email, verified, policy)
                .await?
            {
                return Ok(sign_in);
            }
        }
        Err(UserError::Contended)
    }

    async fn get(&self, user_id: UserId) -> Result<Option<User>, UserError> {
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        load(&mut *conn, user_id.as_uuid()).await
    }

    async fn find_by_identity(
        &self,
        provider: ProviderId,
        subject: &str,
    ) -> Result<Option<User>, UserError> {
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        sqlx::query(concat!(
            "SELECT ",
            user_columns!(),
            " FROM user_identities i JOIN users u ON u.id = i.user_id \
              WHERE i.provider = $1 AND i.subject = $2"
        ))
        .bind(provider.as_str())
        .bind(subject)
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend)?
        .as_ref()
        .map(decode)
        .transpose()
    }

    async fn link(&self, user_id: UserId, identity: &VerifiedIdentity) -> Result<User, UserError> {
        check_identity(identity)?;
        for _ in 0..ATTEMPTS {
            if let Some(user) = self.try_link(user_id.as_uuid(), identity).await? {
                return Ok(user);
            }
        }
        Err(UserError::Contended)
    }

    async fn unlink(&self, user_id: UserId, provider: ProviderId) -> Result<User, UserError> {
        let id = user_id.as_uuid();
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let mut tx = conn.begin().await.map_err(backend)?;
        lock_user(&mut tx, id).await?;
        let linked: Vec<String> =
            sqlx::query_scalar("SELECT provider FROM user_identities WHERE user_id = $1")
                .bind(id)
                .fetch_all(&mut *tx)
                .await
                .map_err(backend)?;
        if !linked.iter().any(|p| p == provider.as_str()) {
            return Err(UserError::NotLinked { provider });
        }
        if linked.len() == 1 {
            return Err(UserError::LastIdentity);
        }
        let subject: String = sqlx::query_scalar(
            "DELETE FROM user_identities WHERE user_id = $1 AND provider = $2 RETURNING subject",
        )
        .bind(id)
        .bind(provider.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(backend)?;
        sqlx::query(
            "INSERT INTO unlinked_identities (user_id, subject_hash) VALUES ($1, $2) \
             ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(subject_hash(provider, &subject))
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        let user = load(&mut *tx, id).await?.ok_or(UserError::NotFound)?;
        tx.commit().await.map_err(backend)?;
        Ok(user)
    }

    async fn erase_identity(
        &self,
        provider: ProviderId,
        subject: &str,
    ) -> Result<Option<Erased>, UserError> {
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let mut tx = conn.begin().await.map_err(backend)?;
        // Nothing of an erased person is kept, not even that a user unlinked them.
        sqlx::query("DELETE FROM unlinked_identities WHERE subject_hash = $1")
            .bind(subject_hash(provider, subject))
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        let owner: Option<Uuid> = sqlx::query_scalar(
            "SELECT user_id FROM user_identities WHERE provider = $1 AND subject = $2",
        )
        .bind(provider.as_str())
        .bind(subject)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        let Some(id) = owner else {
            tx.commit().await.map_err(backend)?;
            return Ok(None);
        };
        // The user's row is locked first, as linking and unlinking do, so the count
        // below cannot race another change of this user's identities.
        lock_user(&mut tx, id).await?;
        let deleted = sqlx::query(
            "DELETE FROM user_identities WHERE provider = $1 AND subject = $2 AND user_id = $3",
        )
        .bind(provider.as_str())
        .bind(subject)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        if deleted.rows_affected() == 0 {
            // Erased or moved meanwhile: nothing of this identity is left to erase.
            tx.commit().await.map_err(backend)?;
            return Ok(None);
        }
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM user_identities WHERE user_id = $1")
                .bind(id)
                .fetch_one(&mut *tx)
                .await
                .map_err(backend)?;
        if left == 0 {
            // Refresh families and the rest go with it (ON DELETE CASCADE).
            sqlx::query("DELETE FROM users WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(Some(Erased {
            user_id: UserId::from_uuid(id),
            user_deleted: left == 0,
        }))
    }

    async fn set_email_deliverable(
        &self,
        provider: ProviderId,
        subject: &str,
        deliverable: bool,
    ) -> Result<Option<UserId>, UserError> {
        let owner: Option<Uuid> = sqlx::query_scalar(
            "UPDATE user_identities SET email_deliverable = $3 \
             WHERE provider = $1 AND subject = $2 RETURNING user_id",
        )
        .bind(provider.as_str())
        .bind(subject)
        .bind(deliverable)
        .fetch_optional(&mut *self.pool.acquire().await.map_err(backend)?)
        .await
        .map_err(backend)?;
        Ok(owner.map(UserId::from_uuid))
    }

    async fn email_deliverable(
        &self,
        provider: ProviderId,
        subject: &str,
    ) -> Result<Option<bool>, UserError> {
        sqlx::query_scalar(
            "SELECT email_deliverable FROM user_identities WHERE provider = $1 AND subject = $2",
        )
        .bind(provider.as_str())
        .bind(subject)
        .fetch_optional(&mut *self.pool.acquire().await.map_err(backend)?)
        .await
        .map_err(backend)
    }

    async fn set_roles(&self, user_id: UserId, roles: &[Role]) -> Result<User, UserError> {
        let roles = dedup_roles(roles);
        let names: Vec<&str> = roles.iter().map(Role::as_str).collect();
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let mut tx = conn.begin().await.map_err(backend)?;
        let updated = sqlx::query("UPDATE users SET roles = $2, updated_at = now() WHERE id = $1")
            .bind(user_id.as_uuid())
            .bind(names)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        if updated.rows_affected() == 0 {
            return Err(UserError::NotFound);
        }
        let user = load(&mut *tx, user_id.as_uuid())
            .await?
            .ok_or(UserError::NotFound)?;
        tx.commit().await.map_err(backend)?;
        Ok(user)
    }

    async fn provision(&self, user_id: UserId, roles: &[Role]) -> Result<User, UserError> {
        let roles = dedup_roles(roles);
        let names: Vec<&str> = roles.iter().map(Role::as_str).collect();
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        sqlx::query("INSERT INTO users (id, roles) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING")
            .bind(user_id.as_uuid())
            .bind(names)
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
        load(&mut *conn, user_id.as_uuid())
            .await?
            .ok_or(UserError::NotFound)
    }
}
