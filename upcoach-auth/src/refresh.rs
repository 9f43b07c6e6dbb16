//! Refresh tokens: opaque, stored only as a hash, rotated on every use, with reuse
//! detection per family (RFC 9700 §4.14).
//!
//! - A [`RefreshToken`] is 256 bits from the operating system's randomness, written as
//!   base64url (43 characters). Stores keep only its SHA-256 [`TokenHash`]; `Debug`
//!   never shows the token.
//! - A *family* is one sign-in session ([`SessionId`], the `sid` of the access tokens).
//!   [`RefreshStore::open_family`] issues its first token; [`RefreshStore::rotate`]
//!   exchanges a token for its child in the same family. A family lives at most
//!   [`RefreshPolicy::family_lifetime`] (absolute), each token
//!   [`RefreshPolicy::token_ttl`] (never past its family's end).
//! - **Reuse**: a token that was already exchanged, presented again, revokes its whole
//!   family and answers [`RefreshError::Reused`] with the user and family, so the caller
//!   can record the `refresh_token_reused` security event.
//! - **Grace**: within [`RefreshPolicy::grace`] (default 0: off) of its rotation, the
//!   *immediate parent* of a token nobody has used yet may be presented again, and gets a
//!   new sibling child ([`Rotation::grace_retry`]): an honest client retrying a request
//!   whose response it lost. Once any child of it has been used, or after the grace, the
//!   parent is reuse. Once one of several siblings has been used, presenting another one
//!   is reuse too, so a family never has two live lines.
//! - **Device binding** ([`device`]): a family may be bound to a [`DeviceFingerprint`]
//!   when it is opened; [`RefreshStore::rotate`] then takes the fingerprint the refresh
//!   presents, and any other (or none) revokes the family and answers
//!   [`RefreshError::DeviceMismatch`]: a token used from another device is treated as
//!   stolen, like reuse, and the caller records `refresh_device_mismatch`. A family
//!   opened without a fingerprint (a native client that sent no device id, a session
//!   issued by the host, a family from before the `device_fingerprint` column) is not
//!   bound and accepts any. The comparison is constant-time.
//! - **Concurrency**: of two rotations of one token, at most one rotates it; the other is
//!   a grace retry or reuse. After [`RefreshStore::revoke_family`] returns, no token of
//!   the family rotates any more, whatever was in flight.
//!
//! Every decision takes `now` from the caller (its [`Clock`](upcoach_core::Clock)), so
//! tests move a [`ManualClock`](upcoach_core::ManualClock) instead of sleeping. Times
//! are kept to the microsecond, as Postgres keeps them.
//!
//! Backends: [`MemoryRefreshStore`] (always built) and `PgRefreshStore` (feature
//! `postgres`), both held to `upcoach_auth::testing::refresh::refresh_store_conformance`.
//!
//! ```
//! use std::time::Duration;
//! use upcoach_auth::refresh::{DeviceId, MemoryRefreshStore, RefreshPolicy, RefreshStore};
//! use upcoach_core::{Clock, ManualClock, UserId};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let clock = ManualClock::starting_now();
//! let store = MemoryRefreshStore::new(RefreshPolicy::default());
//! let user = UserId::new();
//!
//! // Sign-in from a phone: the first token of a new family, bound to the phone.
//! let phone = DeviceId::parse("6F9619FF-8B86-D011-B42D-00CF4FC964FF").unwrap().fingerprint();
//! let issued = store.open_family(user, Some(phone), clock.now()).await?;
//!
//! // Each refresh exchanges the token for a new one in the same family.
//! clock.advance(Duration::from_secs(15 * 60));
//! let rotation = store.rotate(issued.token.expose(), Some(phone), clock.now()).await?;
//! assert_eq!((rotation.user_id, rotation.family_id), (user, issued.family_id));
//!
//! // The old token again: reuse. The family is revoked, the new token stops working.
//! let reused = store.rotate(issued.token.expose(), Some(phone), clock.now()).await.unwrap_err();
//! assert_eq!(reused.code(), "refresh_token_reused");
//! let revoked = store.rotate(rotation.token.expose(), Some(phone), clock.now()).await.unwrap_err();
//! assert_eq!(revoked.code(), "refresh_token_revoked");
//!
//! // Another sign-in; its token shows up on another device: the family is revoked.
//! let issued = store.open_family(user, Some(phone), clock.now()).await?;
//! let laptop = DeviceId::parse("laptop-0001").unwrap().fingerprint();
//! let stolen = store.rotate(issued.token.expose(), Some(laptop), clock.now()).await.unwrap_err();
//! assert_eq!(stolen.code(), "device_mismatch");
//! let revoked = store.rotate(issued.token.expose(), Some(phone), clock.now()).await.unwrap_err();
//! assert_eq!(revoked.code(), "refresh_token_revoked");
//! # Ok::<(), upcoach_auth::refresh::RefreshError>(())
//! # }).unwrap();
//! ```

pub mod device;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod token;

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use upcoach_core::{SessionId, UserId};

pub use device::{DeviceFingerprint, DeviceId, InvalidDeviceId};
pub use memory::{
    DEFAULT_MAX_FAMILIES, DEFAULT_MAX_TOKENS, MemoryRefreshStats, MemoryRefreshStore,
};
#[cfg(feature = "postgres")]
pub use postgres::PgRefreshStore;
pub use token::{RefreshToken, TOKEN_BYTES, TOKEN_LEN, TokenHash};

/// The default lifetime of one refresh token: 30 days.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The default absolute lifetime of a family (a sign-in session): 90 days.
pub const DEFAULT_FAMILY_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long refresh tokens and their families live, and the retry grace.
///
/// ```
/// use std::time::Duration;
/// use upcoach_auth::refresh::RefreshPolicy;
///
/// let policy = RefreshPolicy::default().with_grace(Duration::from_secs(10));
/// assert_eq!(policy.token_ttl, Duration::from_secs(30 * 24 * 3600));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshPolicy {
    /// How long one token is good for (default 30 days), never past its family's end.
    pub token_ttl: Duration,
    /// The absolute lifetime of a family from sign-in (default 90 days): no rotation
    /// extends it.
    pub family_lifetime: Duration,
    /// How long after its rotation the immediate parent of an unused token may be
    /// presented again for a sibling (default 0: never). Keep it to seconds (10 s is
    /// typical): it is the window in which a stolen parent is not detected.
    pub grace: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            token_ttl: DEFAULT_TOKEN_TTL,
            family_lifetime: DEFAULT_FAMILY_LIFETIME,
            grace: Duration::ZERO,
        }
    }
}

impl RefreshPolicy {
    /// Sets [`RefreshPolicy::token_ttl`].
    pub fn with_token_ttl(mut self, ttl: Duration) -> Self {
        self.token_ttl = ttl;
        self
    }

    /// Sets [`RefreshPolicy::family_lifetime`].
    pub fn with_family_lifetime(mut self, lifetime: Duration) -> Self {
        self.family_lifetime = lifetime;
        self
    }

    /// Sets [`RefreshPolicy::grace`].
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// `(token expiry, family expiry)` of a family opened at `now` (microseconds, as
    /// stored): a token never outlives its family.
    pub fn first_expiries(&self, now: SystemTime) -> (SystemTime, SystemTime) {
        let family = to_micros(later(now, self.family_lifetime));
        (to_micros(later(now, self.token_ttl)).min(family), family)
    }
}

/// The first token of a new family.
#[derive(Debug, Clone)]
pub struct IssuedRefresh {
    /// The token for the client.
    pub token: RefreshToken,
    /// The family (the sign-in session; the access tokens' `sid`).
    pub family_id: SessionId,
    /// When the token expires.
    pub expires_at: SystemTime,
    /// When the family ends, whatever rotations happen.
    pub family_expires_at: SystemTime,
}

/// A successful refresh: the new token and whose it is.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// The family's user.
    pub user_id: UserId,
    /// The family.
    pub family_id: SessionId,
    /// The new token for the client.
    pub token: RefreshToken,
    /// When the new token expires.
    pub expires_at: SystemTime,
    /// Whether this was a grace retry of a parent rotated moments ago (a sibling was
    /// issued) rather than the rotation of an unused token.
    pub grace_retry: bool,
}

/// A family and its user, as found by [`RefreshStore::revoke_presented`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshFamily {
    /// The family.
    pub family_id: SessionId,
    /// Its user.
    pub user_id: UserId,
}

/// Why a family was revoked (kept by stores that keep it, such as Postgres).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RevokeReason {
    /// The user signed out.
    Logout,
    /// A rotated token was presented again.
    Reuse,
    /// Every session of the user was ended ([`RefreshStore::revoke_user`]).
    AllSessions,
    /// An operator or the host decided.
    Admin,
    /// A token of the family was presented from another device than the family is
    /// bound to.
    DeviceMismatch,
}

impl RevokeReason {
    /// A stable, snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::Logout => "logout",
            RevokeReason::Reuse => "reuse",
            RevokeReason::AllSessions => "all_sessions",
            RevokeReason::Admin => "admin",
            RevokeReason::DeviceMismatch => "device_mismatch",
        }
    }
}

/// What the stores removed in [`RefreshStore::purge_expired`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Families past their absolute lifetime.
    pub families: u64,
    /// Tokens past their expiry (those of removed families included).
    pub tokens: u64,
}

/// Why a refresh token was not accepted.
///
/// The token codes say nothing more than these six facts; in particular an unknown
/// token and a malformed one are both [`RefreshError::Invalid`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RefreshError {
    /// Not a token we issued (or one removed since it expired).
    #[error("the refresh token is invalid")]
    Invalid,
    /// The token, or its family's absolute lifetime, has expired.
    #[error("the refresh token has expired")]
    Expired,
    /// The token's family was revoked (logout, reuse, all sessions ended).
    #[error("the refresh token has been revoked")]
    Revoked,
    /// The token had already been exchanged: its whole family is now revoked. Record a
    /// `refresh_token_reused` security event with these.
    #[error("a rotated refresh token was used again; its family is revoked")]
    Reused {
        /// The family's user.
        user_id: UserId,
        /// The revoked family.
        family_id: SessionId,
    },
    /// The family is bound to another device than the refresh presented (or the refresh
    /// presented none): its whole family is now revoked. Record a
    /// `refresh_device_mismatch` security event with these.
    #[error("this refresh token belongs to another device; its family is revoked")]
    DeviceMismatch {
        /// The family's user.
        user_id: UserId,
        /// The revoked family.
        family_id: SessionId,
    },
    /// A logout presented a refresh token of another user's family
    /// ([`RefreshStore::revoke_presented`]); nothing was revoked.
    #[error("this refresh token belongs to another user")]
    NotOwner,
    /// The store refused to open a family for a user it does not know (Postgres: no
    /// such row in `users`).
    #[error("no such user")]
    UnknownUser,
    /// A bounded store ([`MemoryRefreshStore`]) holds the most families or tokens it
    /// may, every one of them live: nothing was changed, and a presented token stays
    /// good. Worth retrying later, as sessions end.
    #[error(
        "the refresh token store is full (at most {families} sessions and {tokens} tokens); try again later"
    )]
    Full {
        /// The store's most families.
        families: usize,
        /// The store's most tokens.
        tokens: usize,
    },
    /// The operating system's randomness failed.
    #[error("the operating system's random number generator failed")]
    Random(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store could not be reached or failed.
    #[error("the refresh token store ({backend}) failed")]
    Backend {
        /// Which store.
        backend: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl RefreshError {
    /// A stable, snake_case code for clients and logs.
    pub fn code(&self) -> &'static str {
        match self {
            RefreshError::Invalid => "refresh_token_invalid",
            RefreshError::Expired => "refresh_token_expired",
            RefreshError::Revoked => "refresh_token_revoked",
            RefreshError::Reused { .. } => "refresh_token_reused",
            RefreshError::DeviceMismatch { .. } => "device_mismatch",
            RefreshError::NotOwner => "refresh_token_not_yours",
            RefreshError::UnknownUser => "unknown_user",
            RefreshError::Full { .. } => "refresh_store_full",
            RefreshError::Random(_) => "internal_error",
            RefreshError::Backend { .. } => "refresh_store_unavailable",
        }
    }

    /// Whether trying again later could succeed: the store failed, or was full.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RefreshError::Backend { .. } | RefreshError::Full { .. }
        )
    }
}

/// Where refresh-token families live.
///
/// Every method takes `now` from the caller's [`Clock`](upcoach_core::Clock). Presented
/// tokens are the client's text as received: anything malformed or unknown is
/// [`RefreshError::Invalid`].
///
/// Implementing your own store usually means wrapping one of ours; a wrapper that counts
/// detected reuse:
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::time::SystemTime;
/// use async_trait::async_trait;
/// use upcoach_auth::refresh::*;
/// use upcoach_core::{SessionId, UserId};
///
/// #[derive(Debug)]
/// struct CountReuse<S> {
///     inner: S,
///     reused: AtomicU64,
/// }
///
/// #[async_trait]
/// impl<S: RefreshStore> RefreshStore for CountReuse<S> {
///     fn policy(&self) -> &RefreshPolicy {
///         self.inner.policy()
///     }
///     async fn open_family(&self, user: UserId, device: Option<DeviceFingerprint>, now: SystemTime)
///         -> Result<IssuedRefresh, RefreshError> {
///         self.inner.open_family(user, device, now).await
///     }
///     async fn rotate(&self, presented: &str, device: Option<DeviceFingerprint>, now: SystemTime)
///         -> Result<Rotation, RefreshError> {
///         let result = self.inner.rotate(presented, device, now).await;
///         if let Err(RefreshError::Reused { .. }) = &result {
///             self.reused.fetch_add(1, Ordering::Relaxed);
///         }
///         result
///     }
///     async fn revoke_family(&self, family: SessionId, reason: RevokeReason, now: SystemTime)
///         -> Result<bool, RefreshError> {
///         self.inner.revoke_family(family, reason, now).await
///     }
///     async fn revoke_presented(&self, presented: &str, owner: UserId, now: SystemTime)
///         -> Result<Option<RefreshFamily>, RefreshError> {
///         self.inner.revoke_presented(presented, owner, now).await
///     }
///     async fn revoke_user(&self, user: UserId, now: SystemTime) -> Result<u64, RefreshError> {
///         self.inner.revoke_user(user, now).await
///     }
///     async fn purge_expired(&self, now: SystemTime) -> Result<Purged, RefreshError> {
///         self.inner.purge_expired(now).await
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = CountReuse { inner: MemoryRefreshStore::default(), reused: AtomicU64::new(0) };
/// let now = SystemTime::now();
/// let issued = store.open_family(UserId::new(), None, now).await.unwrap();
/// store.rotate(issued.token.expose(), None, now).await.unwrap();
/// assert!(store.rotate(issued.token.expose(), None, now).await.is_err());
/// assert_eq!(store.reused.load(Ordering::Relaxed), 1);
/// # });
/// ```
#[async_trait]
pub trait RefreshStore: fmt::Debug + Send + Sync + 'static {
    /// The lifetimes and grace this store applies.
    fn policy(&self) -> &RefreshPolicy;

    /// Opens a new family for `user` (a sign-in) and issues its first token. With
    /// `device`, the family is bound to it for its whole life; without, it is not bound.
    /// A store keeps the fingerprint only, never a device id.
    async fn open_family(
        &self,
        user: UserId,
        device: Option<DeviceFingerprint>,
        now: SystemTime,
    ) -> Result<IssuedRefresh, RefreshError>;

    /// Exchanges `presented`, sent from the device whose fingerprint is `device` (`None`:
    /// the client named no device), for a new token of the same family (a refresh).
    ///
    /// Errors: [`RefreshError::Invalid`] (unknown or malformed), [`RefreshError::Expired`]
    /// (the token or its family), [`RefreshError::DeviceMismatch`] (the family is bound
    /// to another device, see [`DeviceFingerprint::accepts`]: the family is now revoked),
    /// [`RefreshError::Reused`] (already exchanged, outside the grace rules: the family
    /// is now revoked), [`RefreshError::Revoked`] (the family was revoked),
    /// [`RefreshError::Backend`].
    ///
    /// The checks, in order: the family's absolute end and the token's expiry (an
    /// expired token answers `Expired` and changes nothing, even if it was exchanged);
    /// the device (another device is `DeviceMismatch` whatever state the token and its
    /// family are in, and again each time: each attempt is worth a security event); an
    /// exchanged token is a grace retry or reuse (reuse again, with the family revoked
    /// already, is still `Reused`: each replay is worth a security event); a revoked
    /// family; an unused sibling of a token that was used is reuse.
    async fn rotate(
        &self,
        presented: &str,
        device: Option<DeviceFingerprint>,
        now: SystemTime,
    ) -> Result<Rotation, RefreshError>;

    /// Revokes a family: none of its tokens rotates once this returns. `true` if this
    /// call revoked it, `false` if it was revoked already or is unknown.
    async fn revoke_family(
        &self,
        family: SessionId,
        reason: RevokeReason,
        now: SystemTime,
    ) -> Result<bool, RefreshError>;

    /// Logout: revokes the family of `presented` (any token of it, rotated or expired
    /// too) if it belongs to `owner`, the signed-in user asking. A family of another user
    /// is [`RefreshError::NotOwner`] and stays as it was. `None` for an unknown or
    /// malformed token, which is not an error: the caller answers the same either way.
    async fn revoke_presented(
        &self,
        presented: &str,
        owner: UserId,
        now: SystemTime,
    ) -> Result<Option<RefreshFamily>, RefreshError>;

    /// Revokes every live family of `user` (sign out everywhere); how many it revoked.
    async fn revoke_user(&self, user: UserId, now: SystemTime) -> Result<u64, RefreshError>;

    /// Removes families past their absolute lifetime and tokens past their expiry (plus
    /// the grace). Presented afterwards, such a token is [`RefreshError::Invalid`]
    /// instead of [`RefreshError::Expired`]. The memory store also does this a little at
    /// a time on every call; run it periodically on Postgres.
    async fn purge_expired(&self, now: SystemTime) -> Result<Purged, RefreshError>;
}

/// Runs [`RefreshStore::purge_expired`] on `store` every `every` (at least 1 ms; the
/// first round one interval from now), timed by `clock`, until the task is aborted.
/// Each round is logged (a failed one as a warning: the next round tries again) and
/// what it removed handed to `report` (for a metric). The memory store purges a little
/// on every call anyway; Postgres needs this.
pub fn spawn_purge(
    store: std::sync::Arc<dyn RefreshStore>,
    clock: std::sync::Arc<dyn upcoach_core::Clock>,
    every: Duration,
    report: impl Fn(Purged) + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let every = every.max(Duration::from_millis(1));
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match store.purge_expired(clock.now()).await {
                Ok(purged) => {
                    if purged.families + purged.tokens > 0 {
                        tracing::info!(
                            families = purged.families,
                            tokens = purged.tokens,
                            "expired refresh tokens deleted"
                        );
                    }
                    report(purged);
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "deleting expired refresh tokens failed; trying again next round"
                ),
            }
        }
    })
}

/// `t` cut to whole microseconds, as Postgres keeps it.
pub(crate) fn to_micros(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SystemTime::UNIX_EPOCH + Duration::new(d.as_secs(), d.subsec_micros() * 1_000),
        Err(e) => {
            let d = e.duration();
            let up = Duration::new(d.as_secs(), d.subsec_nanos().div_ceil(1_000) * 1_000);
            SystemTime::UNIX_EPOCH - up
        }
    }
}

/// `now + d`, saturating far in the future instead of overflowing.
pub(crate) fn later(now: SystemTime, d: Duration) -> SystemTime {
    now.checked_add(d)
        .unwrap_or_else(|| SystemTime::UNIX_EPOCH + Duration::from_secs(200_000 * 365 * 86_400))
}

/// What a store knows about a presented token when it decides.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Observed {
    /// The token's expiry.
    pub(crate) expires_at: SystemTime,
    /// The family's absolute end.
    pub(crate) family_expires_at: SystemTime,
    /// When the token was exchanged, if it was.
    pub(crate) rotated_at: Option<SystemTime>,
    /// Whether the token or its family is revoked.
    pub(crate) revoked: bool,
    /// Whether the family accepts the presented device ([`DeviceFingerprint::accepts`]).
    pub(crate) device_accepted: bool,
    /// Whether a child of this token has been exchanged already.
    pub(crate) child_rotated: bool,
    /// Whether another child of this token's parent has been exchanged already.
    pub(crate) sibling_rotated: bool,
}

/// Whether a token expiring at `expires_at`, of a family ending at `family_expires_at`,
/// is expired at `now` (the first check of [`decide`]).
pub(crate) fn is_expired(
    expires_at: SystemTime,
    family_expires_at: SystemTime,
    now: SystemTime,
) -> bool {
    now >= family_expires_at || now >= expires_at
}

/// What to do with a presented, known token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Exchange it for a child.
    Rotate,
    /// Issue another child of this parent (an honest retry).
    GraceRetry,
    /// Revoke the family and answer `refresh_token_reused`.
    Reuse,
    /// Answer `refresh_token_revoked`.
    Revoked,
    /// Answer `refresh_token_expired`.
    Expired,
    /// Revoke the family and answer `device_mismatch`.
    DeviceMismatch,
}

/// The one decision every store makes, in this order: expiry (the family's, then the
/// token's); another device; an exchanged token is a grace retry or reuse; a revoked
/// family; a sibling of an exchanged token is reuse; otherwise rotate.
pub(crate) fn decide(token: &Observed, policy: &RefreshPolicy, now: SystemTime) -> Verdict {
    if is_expired(token.expires_at, token.family_expires_at, now) {
        return Verdict::Expired;
    }
    if !token.device_accepted {
        return Verdict::DeviceMismatch;
    }
    if let Some(rotated_at) = token.rotated_at {
        let within_grace = !policy.grace.is_zero() && now < later(rotated_at, policy.grace);
        return if within_grace && !token.revoked && !token.child_rotated {
            Verdict::GraceRetry
        } else {
            Verdict::Reuse
        };
    }
    if token.revoked {
        return Verdict::Revoked;
    }
    if token.sibling_rotated {
        return Verdict::Reuse;
    }
    Verdict::Rotate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_prints_the_token() {
        let token = RefreshToken::generate().unwrap();
        let issued = IssuedRefresh {
            token: token.clone(),
            family_id: SessionId::new(),
            expires_at: SystemTime::now(),
            family_expires_at: SystemTime::now(),
        };
        for text in [
            format!("{token:?}"),
            format!("{token}"),
            format!("{issued:?}"),
            format!("{:?}", token.hash()),
        ] {
            assert!(!text.contains(token.expose()), "{text}");
        }
    }

    #[test]
    fn micros_truncate_both_sides_of_the_epoch() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(5, 123_456_789);
        assert_eq!(
            to_micros(t),
            SystemTime::UNIX_EPOCH + Duration::new(5, 123_456_000)
        );
        let before = SystemTime::UNIX_EPOCH - Duration::new(5, 123_456_789);
        assert_eq!(
            to_micros(before),
            SystemTime::UNIX_EPOCH - Duration::new(5, 123_457_000)
        );
    }

    #[test]
    fn decisions() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = Duration::from_secs(1);
        let fresh = Observed {
            expires_at: t + 100 * s,
            family_expires_at: t + 200 * s,
            rotated_at: None,
            revoked: false,
            device_accepted: true,
            child_rotated: false,
            sibling_rotated: false,
        };
        let strict = RefreshPolicy::default();
        let lenient = strict.with_grace(10 * s);
        assert_eq!(decide(&fresh, &strict, t), Verdict::Rotate);
        assert_eq!(decide(&fresh, &strict, t + 100 * s), Verdict::Expired);
        let short_family = Observed {
            family_expires_at: t + 50 * s,
            ..fresh
        };
        assert_eq!(decide(&short_family, &strict, t + 50 * s), Verdict::Expired);
        let revoked = Observed {
            revoked: true,
            ..fresh
        };
        assert_eq!(decide(&revoked, &strict, t), Verdict::Revoked);
        let stale = Observed {
            sibling_rotated: true,
            ..fresh
        };
        assert_eq!(decide(&stale, &lenient, t), Verdict::Reuse);

        let rotated = Observed {
            rotated_at: Some(t),
            ..fresh
        };
        assert_eq!(decide(&rotated, &strict, t), Verdict::Reuse);
        assert_eq!(
            decide(&rotated, &strict, t - s),
            Verdict::Reuse,
            "no grace even when the caller's clock is behind"
        );
        assert_eq!(decide(&rotated, &lenient, t + 9 * s), Verdict::GraceRetry);
        assert_eq!(decide(&rotated, &lenient, t + 10 * s), Verdict::Reuse);
        let ancestor = Observed {
            child_rotated: true,
            ..rotated
        };
        assert_eq!(decide(&ancestor, &lenient, t + s), Verdict::Reuse);
        let rotated_and_revoked = Observed {
            revoked: true,
            ..rotated
        };
        assert_eq!(
            decide(&rotated_and_revoked, &lenient, t + s),
            Verdict::Reuse
        );

        // Another device: after expiry, before everything else.
        let elsewhere = Observed {
            device_accepted: false,
            ..fresh
        };
        assert_eq!(decide(&elsewhere, &lenient, t), Verdict::DeviceMismatch);
        assert_eq!(decide(&elsewhere, &lenient, t + 100 * s), Verdict::Expired);
        for state in [rotated, revoked, stale, rotated_and_revoked] {
            let elsewhere = Observed {
                device_accepted: false,
                ..state
            };
            assert_eq!(decide(&elsewhere, &lenient, t + s), Verdict::DeviceMismatch);
        }
    }
}
