//! Users and their linked provider identities, and how a sign-in finds, links or creates
//! a user.
//!
//! An identity is keyed by (provider, subject), never by e-mail address. What
//! [`UserStore::sign_in`] does with a [`VerifiedIdentity`]:
//!
//! 1. **Known identity**: its user, whatever the address says now (the identity's stored
//!    address and `email_verified` are refreshed).
//! 2. **New identity, no other user has its address**: a new user with role `user`,
//!    the identity's address and name, and this one identity.
//! 3. **New identity whose address is not vouched for** (not verified, or the
//!    [`LinkingPolicy`] does not trust the provider's addresses), **and some user has
//!    its address**: [`UserError::AccountExists`]: the person signs in the way they did
//!    before and links this provider explicitly ([`UserStore::link`]).
//! 4. **New identity whose address is vouched for** (verified, by a trusted provider):
//!    - exactly one user holds the address verified (through an identity of a
//!      provider the policy trusts: an untrusted provider's "verified" counts for
//!      nothing, on either side): linked to that user, unless it has an identity of this provider
//!      already, or unlinked this very identity before ([`UserError::AccountExists`]:
//!      an unlink sticks until the user links the identity again with
//!      [`UserStore::link`]);
//!    - several users hold it verified: [`UserError::AccountExists`];
//!    - users hold it, none verified: a new user, as in 2. An address someone
//!      registered with a provider that does not verify it never locks its proven
//!      owner out, nor gets linked to.
//!
//! "Has the address" compares case-insensitively against the user's own address and
//! the addresses of its identities. Requiring the existing user to hold the address
//! verified by a trusted provider keeps an attacker who registered someone else's
//! address with a provider that does not verify it, or with one that says "verified"
//! but is not trusted, from getting that person's later sign-ins linked to the
//! attacker's account;
//! ignoring unverified holders for a vouched-for address keeps that attacker from
//! blocking them (`account_exists` forever).
//!
//! A user has at most one identity per provider, and always at least one:
//! [`UserStore::unlink`] refuses the last ([`UserError::LastIdentity`]).
//!
//! Backends: [`MemoryUserStore`] (always built) and `PgUserStore` (feature `postgres`,
//! tables `users` and `user_identities`), both held to
//! `upcoach_auth::testing::users::user_store_conformance`.
//!
//! ```
//! use upcoach_auth::users::{LinkingPolicy, MemoryUserStore, UserError, UserStore};
//! use upcoach_auth::{ProviderId, VerifiedIdentity};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let store = MemoryUserStore::new();
//! let policy = LinkingPolicy::default(); // Google and Apple addresses link; Facebook's do not.
//! let identity = |provider, subject: &str| VerifiedIdentity {
//!     provider,
//!     subject: subject.into(),
//!     email: Some("ada@example.com".into()),
//!     email_verified: true,
//!     name: Some("Ada".into()),
//!     expires_at: None,
//! };
//!
//! let first = store.sign_in(&identity(ProviderId::GOOGLE, "g-1"), &policy).await?;
//! assert!(first.created);
//!
//! // Apple, same verified address: linked to the same user.
//! let apple = store.sign_in(&identity(ProviderId::APPLE, "a-1"), &policy).await?;
//! assert!(apple.linked && apple.user.id == first.user.id);
//! assert_eq!(apple.user.providers, [ProviderId::GOOGLE, ProviderId::APPLE]);
//!
//! // Facebook, same address: refused until the user links it while signed in.
//! let facebook = identity(ProviderId::FACEBOOK, "f-1");
//! let refused = store.sign_in(&facebook, &policy).await.unwrap_err();
//! assert_eq!(refused.code(), "account_exists");
//! let user = store.link(first.user.id, &facebook).await?;
//! assert_eq!(user.providers.len(), 3);
//! # Ok::<(), UserError>(())
//! # }).unwrap();
//! ```

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use upcoach_core::{Role, UserId};

use crate::{ProviderId, VerifiedIdentity};

mod memory;
#[cfg(feature = "postgres")]
mod postgres;

pub use memory::{DEFAULT_MAX_USERS, MAX_UNLINKED_PER_USER, MemoryUserStore};
#[cfg(feature = "postgres")]
pub use postgres::PgUserStore;

/// The longest provider subject accepted, in bytes.
pub const MAX_SUBJECT_LEN: usize = 255;
/// The longest e-mail address accepted, in bytes.
pub const MAX_EMAIL_LEN: usize = 320;
/// The longest display name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 1024;

/// One of our users, as `GET /auth/me` shows it.
///
/// Serializes to `{"id","email","email_verified","name","roles":[...],"providers":[...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The stable identifier.
    pub id: UserId,
    /// The address the user was created with, if the provider gave one.
    pub email: Option<String>,
    /// Whether that provider said it verified the address.
    pub email_verified: bool,
    /// The display name the user was created with, if any.
    pub name: Option<String>,
    /// The roles granted (a new user has `user`).
    pub roles: Vec<Role>,
    /// The providers the user can sign in with, in the order they were linked.
    pub providers: Vec<ProviderId>,
}

/// What [`UserStore::erase_identity`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erased {
    /// The user the identity belonged to.
    pub user_id: UserId,
    /// The identity was the user's last, so the user was removed too.
    pub user_deleted: bool,
}

/// What [`UserStore::sign_in`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignIn {
    /// The signed-in user (after any change).
    pub user: User,
    /// The user was created by this sign-in.
    pub created: bool,
    /// The identity was new and was linked to an existing user by its address.
    pub linked: bool,
}

/// Per provider, whether a *verified* address from it may link a new identity to an
/// existing user automatically.
///
/// The default trusts Google and Apple, which verify the addresses they report, and not
/// Facebook. Parse one from a comma-separated list of the trusted providers (`""` for
/// none):
///
/// ```
/// use upcoach_auth::ProviderId;
/// use upcoach_auth::users::LinkingPolicy;
///
/// let policy: LinkingPolicy = "google".parse()?;
/// assert!(policy.trusts(ProviderId::GOOGLE) && !policy.trusts(ProviderId::APPLE));
/// assert!(LinkingPolicy::default().trusts(ProviderId::APPLE));
/// assert!(!LinkingPolicy::none().trusts(ProviderId::GOOGLE));
/// # Ok::<(), upcoach_auth::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkingPolicy {
    trusted: HashSet<ProviderId>,
}

impl LinkingPolicy {
    /// A policy that links nothing automatically.
    pub fn none() -> Self {
        Self {
            trusted: HashSet::new(),
        }
    }

    /// The same policy with `provider`'s verified addresses trusted or not.
    pub fn with(mut self, provider: ProviderId, trusted: bool) -> Self {
        if trusted {
            self.trusted.insert(provider);
        } else {
            self.trusted.remove(&provider);
        }
        self
    }

    /// Whether `provider`'s verified addresses may link automatically.
    pub fn trusts(&self, provider: ProviderId) -> bool {
        self.trusted.contains(&provider)
    }

    /// The trusted providers, in no particular order.
    pub fn trusted(&self) -> impl Iterator<Item = ProviderId> + '_ {
        self.trusted.iter().copied()
    }
}

impl Default for LinkingPolicy {
    fn default() -> Self {
        Self::none()
            .with(ProviderId::GOOGLE, true)
            .with(ProviderId::APPLE, true)
    }
}

impl FromStr for LinkingPolicy {
    type Err = crate::Error;

    /// The trusted providers, comma-separated (`google,apple`); blanks around names are
    /// ignored, a name that is not a provider name is an error.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut policy = Self::none();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            policy = policy.with(name.parse()?, true);
        }
        Ok(policy)
    }
}

/// What can go wrong in a user store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UserError {
    /// No user has this id.
    #[error("no such user")]
    NotFound,
    /// The identity is new and its address belongs to an existing account that it may
    /// not join automatically: sign in the usual way, then link this provider.
    #[error("an account with this e-mail address exists: sign in with it, then link this provider")]
    AccountExists,
    /// The identity is linked to another user.
    #[error("this identity is linked to another user")]
    IdentityTaken,
    /// The user already has another identity of this provider.
    #[error("the user already has a {provider} identity")]
    ProviderAlreadyLinked {
        /// The provider.
        provider: ProviderId,
    },
    /// The user has no identity of this provider.
    #[error("the user has no {provider} identity")]
    NotLinked {
        /// The provider.
        provider: ProviderId,
    },
    /// Unlinking would leave the user no way to sign in.
    #[error("this is the user's last way to sign in")]
    LastIdentity,
    /// The identity cannot be stored (empty subject, a field too long or with a NUL).
    #[error("invalid identity: {reason}")]
    InvalidIdentity {
        /// Why.
        reason: &'static str,
    },
    /// A bounded store ([`MemoryUserStore`]) holds the most users it may: no user was
    /// created. Existing users are not affected.
    #[error(
        "this server holds the most user accounts it may ({max_users}); no new account was made"
    )]
    Full {
        /// The store's most users.
        max_users: usize,
    },
    /// The user has unlinked the most identities a bounded store ([`MemoryUserStore`])
    /// remembers for one user: no other identity is linked to them. What is linked
    /// stays, and unlinking still works.
    #[error(
        "this account has unlinked {max} identities, the most this server remembers; no other identity can be linked to it"
    )]
    TooManyUnlinked {
        /// The most unlinked identities remembered per user.
        max: usize,
    },
    /// Concurrent changes kept this call from completing after several attempts.
    #[error("too many concurrent changes to this user; try again")]
    Contended,
    /// Stored data is not what this crate writes (an unknown provider or role name).
    #[error("stored user data is corrupt: {reason}")]
    Corrupt {
        /// What was wrong.
        reason: &'static str,
    },
    /// The backend failed or did not answer in time.
    #[error("{backend} user store backend failed")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl UserError {
    /// A stable, snake_case code for clients (the reference server answers 409 for
    /// `account_exists`, `identity_taken`, `provider_already_linked` and
    /// `last_identity`).
    pub fn code(&self) -> &'static str {
        match self {
            UserError::NotFound => "user_not_found",
            UserError::AccountExists => "account_exists",
            UserError::IdentityTaken => "identity_taken",
            UserError::ProviderAlreadyLinked { .. } => "provider_already_linked",
            UserError::NotLinked { .. } => "not_linked",
            UserError::LastIdentity => "last_identity",
            UserError::InvalidIdentity { .. } => "invalid_identity",
            UserError::Full { .. } => "user_store_full",
            UserError::TooManyUnlinked { .. } => "too_many_unlinked_identities",
            UserError::Contended => "user_store_contended",
            UserError::Corrupt { .. } => "internal_error",
            UserError::Backend { .. } => "user_store_unavailable",
        }
    }

    /// Whether trying again later could succeed: a backend failure or contention.
    pub fn is_retryable(&self) -> bool {
        matches!(self, UserError::Backend { .. } | UserError::Contended)
    }
}

/// Refuses an identity no store keeps: an empty subject, a subject, address or name
/// over [`MAX_SUBJECT_LEN`], [`MAX_EMAIL_LEN`] or [`MAX_NAME_LEN`] bytes, or a NUL
/// character in any of them.
pub fn check_identity(identity: &VerifiedIdentity) -> Result<(), UserError> {
    let invalid = |reason| Err(UserError::InvalidIdentity { reason });
    if identity.subject.is_empty() {
        return invalid("the subject is empty");
    }
    if identity.subject.len() > MAX_SUBJECT_LEN {
        return invalid("the subject is longer than 255 bytes");
    }
    if identity
        .email
        .as_ref()
        .is_some_and(|e| e.len() > MAX_EMAIL_LEN)
    {
        return invalid("the e-mail address is longer than 320 bytes");
    }
    if identity
        .name
        .as_ref()
        .is_some_and(|n| n.len() > MAX_NAME_LEN)
    {
        return invalid("the name is longer than 1024 bytes");
    }
    let fields = [
        Some(identity.subject.as_str()),
        identity.email.as_deref(),
        identity.name.as_deref(),
    ];
    if fields.into_iter().flatten().any(|f| f.contains('\0')) {
        return invalid("a field contains a NUL character");
    }
    Ok(())
}

/// The identity's address, with an empty one taken as none.
pub(crate) fn email_of(identity: &VerifiedIdentity) -> Option<&str> {
    identity.email.as_deref().filter(|e| !e.is_empty())
}

/// A user that holds a new identity's address, as a first sign-in sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Holder<Id> {
    pub(crate) id: Id,
    /// Holds the address verified, through an identity of a provider the policy trusts.
    pub(crate) verified: bool,
    /// Has an identity of the signing-in provider already.
    pub(crate) has_provider: bool,
    /// Unlinked this very identity before: it links back only explicitly.
    pub(crate) unlinked: bool,
}

/// What a first sign-in of `identity` does, given the users holding its address (see
/// the [module docs](self)): `Ok(None)` makes a new user, `Ok(Some(id))` links to
/// `id`. `holders` need only include the first two verified ones, when there are any.
pub(crate) fn first_sign_in_choice<Id>(
    identity: &VerifiedIdentity,
    policy: &LinkingPolicy,
    holders: impl IntoIterator<Item = Holder<Id>>,
) -> Result<Option<Id>, UserError> {
    let vouched = identity.email_verified && policy.trusts(identity.provider);
    let mut holders = holders.into_iter().peekable();
    if holders.peek().is_none() {
        return Ok(None);
    }
    if !vouched {
        return Err(UserError::AccountExists);
    }
    let mut verified = holders.filter(|h| h.verified);
    match (verified.next(), verified.next()) {
        (None, _) => Ok(None),
        (Some(owner), None) if !owner.has_provider && !owner.unlinked => Ok(Some(owner.id)),
        _ => Err(UserError::AccountExists),
    }
}

/// `roles` without repeats, in their first order.
pub(crate) fn dedup_roles(roles: &[Role]) -> Vec<Role> {
    let mut out: Vec<Role> = Vec::with_capacity(roles.len());
    for role in roles {
        if !out.contains(role) {
            out.push(role.clone());
        }
    }
    out
}

/// Users and their linked provider identities.
///
/// The rules every store follows are in the [module docs](self). A store of your own
/// passes `upcoach_auth::testing::users::user_store_conformance` (feature `testing`).
#[async_trait]
pub trait UserStore: fmt::Debug + Send + Sync + 'static {
    /// Finds the identity's user, links the identity to an existing user, or creates a
    /// user for it, as the [module docs](self) describe. Two concurrent sign-ins of one
    /// new identity make one user.
    async fn sign_in(
        &self,
        identity: &VerifiedIdentity,
        policy: &LinkingPolicy,
    ) -> Result<SignIn, UserError>;

    /// The user with this id, if any.
    async fn get(&self, user_id: UserId) -> Result<Option<User>, UserError>;

    /// The user an identity is linked to, if any (for provider notifications, which
    /// name the subject).
    async fn find_by_identity(
        &self,
        provider: ProviderId,
        subject: &str,
    ) -> Result<Option<User>, UserError>;

    /// Links `identity` to the user (who proved both by signing in). Linking an identity
    /// the user already has is a no-op that refreshes its address; one linked to another
    /// user is [`UserError::IdentityTaken`]; another identity of a provider the user
    /// already has is [`UserError::ProviderAlreadyLinked`].
    async fn link(&self, user_id: UserId, identity: &VerifiedIdentity) -> Result<User, UserError>;

    /// Removes the user's identity of `provider`: [`UserError::NotLinked`] when there is
    /// none, [`UserError::LastIdentity`] when it is the only one left. The unlink is
    /// remembered (a hash of provider and subject only), so that identity never links
    /// back to this user by its address: only [`link`](Self::link) brings it back.
    async fn unlink(&self, user_id: UserId, provider: ProviderId) -> Result<User, UserError>;

    /// Removes `provider`'s identity `subject` whatever else its user has (a person
    /// asked the provider to have their data deleted); when it was the user's last way
    /// to sign in, the user goes too, with everything of theirs. Any user's memory of
    /// having unlinked it goes as well. `None` when no such identity exists.
    async fn erase_identity(
        &self,
        provider: ProviderId,
        subject: &str,
    ) -> Result<Option<Erased>, UserError>;

    /// Marks the address of `provider`'s identity `subject` as deliverable or not (Sign
    /// in with Apple's private relay turned on or off); returns its user, `None` when no
    /// such identity exists. A new identity's address is deliverable.
    async fn set_email_deliverable(
        &self,
        provider: ProviderId,
        subject: &str,
        deliverable: bool,
    ) -> Result<Option<UserId>, UserError>;

    /// Whether the address of `provider`'s identity `subject` is deliverable; `None` when
    /// no such identity exists.
    async fn email_deliverable(
        &self,
        provider: ProviderId,
        subject: &str,
    ) -> Result<Option<bool>, UserError>;

    /// Replaces the user's roles (repeats are dropped, the order kept).
    async fn set_roles(&self, user_id: UserId, roles: &[Role]) -> Result<User, UserError>;

    /// The user `user_id`, created with `roles` and no way to sign in if it does not
    /// exist (an operator's account, or `--dev` tokens); an existing user is returned
    /// unchanged.
    async fn provision(&self, user_id: UserId, roles: &[Role]) -> Result<User, UserError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_serializes_as_the_api_says() {
        let id = UserId::new();
        let user = User {
            id,
            email: Some("ada@example.com".into()),
            email_verified: true,
            name: None,
            roles: vec![Role::USER, Role::COACH],
            providers: vec![ProviderId::GOOGLE, ProviderId::APPLE],
        };
        assert_eq!(
            serde_json::to_value(&user).unwrap(),
            serde_json::json!({
                "id": id.to_string(),
                "email": "ada@example.com",
                "email_verified": true,
                "name": null,
                "roles": ["user", "coach"],
                "providers": ["google", "apple"],
            })
        );
    }

    #[test]
    fn policy_parses_and_defaults() {
        let default = LinkingPolicy::default();
        assert!(default.trusts(ProviderId::GOOGLE));
        assert!(default.trusts(ProviderId::APPLE));
        assert!(!default.trusts(ProviderId::FACEBOOK));
        let parsed: LinkingPolicy = " facebook , google ,".parse().unwrap();
        assert!(parsed.trusts(ProviderId::FACEBOOK) && !parsed.trusts(ProviderId::APPLE));
        assert_eq!("".parse::<LinkingPolicy>().unwrap(), LinkingPolicy::none());
        assert!("google,Git Hub".parse::<LinkingPolicy>().is_err());
    }

    #[test]
    fn identities_are_checked() {
        let ok = VerifiedIdentity {
            provider: ProviderId::GOOGLE,
            subject: "1".into(),
            email: None,
            email_verified: false,
            name: None,
            expires_at: None,
        };
        assert!(check_identity(&ok).is_ok());
        for bad in [
            VerifiedIdentity {
                subject: String::new(),
                ..ok.clone()
            },
            VerifiedIdentity {
                subject: "s".repeat(MAX_SUBJECT_LEN + 1),
                ..ok.clone()
            },
            VerifiedIdentity {
                email: Some("a\0@example.com".into()),
                ..ok.clone()
            },
            VerifiedIdentity {
                name: Some("n".repeat(MAX_NAME_LEN + 1)),
                ..ok.clone()
            },
        ] {
            assert_eq!(check_identity(&bad).unwrap_err().code(), "invalid_identity");
        }
    }
}
