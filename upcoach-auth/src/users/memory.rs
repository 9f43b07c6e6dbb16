//! [`MemoryUserStore`]: users in process memory.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use upcoach_core::{Role, UserId};

use super::{
    Erased, Holder, LinkingPolicy, SignIn, User, UserError, UserStore, check_identity, dedup_roles,
    email_of, first_sign_in_choice,
};
use crate::deletion::SubjectHash;
use crate::{ProviderId, VerifiedIdentity};

/// The default most users a [`MemoryUserStore`] holds: 10,000 users with an address and
/// one identity each measured 6.6 MiB. The bound is kept low because a first sign-in
/// with an address looks at every user (18 ms at 10,000 users in a debug build), under
/// the store's one lock: keep more users in `PgUserStore`.
pub const DEFAULT_MAX_USERS: usize = 10_000;

/// The most identities one user of a [`MemoryUserStore`] has unlinked and the store
/// remembers (so that they are never linked back by address alone). A user who reached
/// it can still unlink what is linked, but no other identity is linked to them
/// ([`UserError::TooManyUnlinked`]): forgetting an unlink would let its identity join
/// the account by address again, against the user's word. Link and unlink cycles with
/// fresh identities are the only way to grow the list, so a person never meets it.
pub const MAX_UNLINKED_PER_USER: usize = 64;

/// A user store in process memory: for one process (the reference server without
/// Postgres), and for tests. Everything is lost when the process ends.
///
/// One lock, never held across an `.await`, makes every call atomic, so concurrent
/// sign-ins of one identity make one user. Finding users by address looks at every
/// user, which is fine for the few a single process holds; keep a real deployment's
/// users in `PgUserStore`.
///
/// **Bounded**: at most [`DEFAULT_MAX_USERS`] users
/// ([`with_max_users`](Self::with_max_users)); each holds at most one identity per
/// provider and remembers at most [`MAX_UNLINKED_PER_USER`] unlinked ones. When it is full, a sign-in that would *create* a user, and
/// [`provision`](UserStore::provision) of a new id, fail with [`UserError::Full`]
/// (503 `user_store_full` at the HTTP face, counted in
/// [`refused_full`](Self::refused_full)). Everyone who has an account keeps signing
/// in, linking and unlinking. Nothing is evicted: a user is an account, not a cache
/// entry, and dropping one would sign a real person out of everything, with their
/// roles, for good. Room comes back only when users are erased
/// ([`erase_identity`](UserStore::erase_identity) of their last identity).
/// `PgUserStore` has no such bound.
///
/// ```
/// use upcoach_auth::users::{MemoryUserStore, UserStore};
/// use upcoach_core::UserId;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = MemoryUserStore::new();
/// assert_eq!(store.get(UserId::new()).await?, None);
/// # Ok::<(), upcoach_auth::users::UserError>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct MemoryUserStore {
    max_users: usize,
    refused_full: AtomicU64,
    state: Mutex<State>,
}

impl Default for MemoryUserStore {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Default)]
struct State {
    users: HashMap<UserId, UserRecord>,
    identities: HashMap<IdentityKey, IdentityRecord>,
    /// Identities each user unlinked (by hash): never linked back by address alone. At
    /// most [`MAX_UNLINKED_PER_USER`] per user.
    unlinked: HashMap<UserId, HashSet<SubjectHash>>,
}

type IdentityKey = (ProviderId, String);

#[derive(Debug)]
struct UserRecord {
    email: Option<String>,
    email_verified: bool,
    name: Option<String>,
    roles: Vec<Role>,
    /// The user's identities, in the order they were linked.
    identities: Vec<IdentityKey>,
}

#[derive(Debug)]
struct IdentityRecord {
    user_id: UserId,
    email: Option<String>,
    email_verified: bool,
    email_deliverable: bool,
}

impl IdentityRecord {
    fn refresh(&mut self, identity: &VerifiedIdentity) {
        self.email = email_of(identity).map(str::to_owned);
        self.email_verified = self.email.is_some() && identity.email_verified;
    }
}

fn key_of(identity: &VerifiedIdentity) -> IdentityKey {
    (identity.provider, identity.subject.clone())
}

fn same_address(stored: Option<&str>, lowered: &str) -> bool {
    stored.is_some_and(|s| s.to_lowercase() == lowered)
}

impl State {
    fn view(&self, id: UserId) -> Option<User> {
        let user = self.users.get(&id)?;
        Some(User {
            id,
            email: user.email.clone(),
            email_verified: user.email_verified,
            name: user.name.clone(),
            roles: user.roles.clone(),
            providers: user.identities.iter().map(|(p, _)| *p).collect(),
        })
    }

    fn view_existing(&self, id: UserId) -> Result<User, UserError> {
        self.view(id).ok_or(UserError::NotFound)
    }

    fn has_unlinked(&self, user_id: UserId, subject: &SubjectHash) -> bool {
        self.unlinked
            .get(&user_id)
            .is_some_and(|hashes| hashes.contains(subject))
    }

    /// [`UserError::TooManyUnlinked`] when `user_id` remembers the most unlinked
    /// identities it may: nothing more is linked to it.
    fn may_link_more(&self, user_id: UserId) -> Result<(), UserError> {
        let unlinked = self.unlinked.get(&user_id).map_or(0, HashSet::len);
        if unlinked >= MAX_UNLINKED_PER_USER {
            return Err(UserError::TooManyUnlinked {
                max: MAX_UNLINKED_PER_USER,
            });
        }
        Ok(())
    }

    /// Whether the user has the (lower-cased) address, and whether it holds it verified
    /// by a provider `policy` trusts (an untrusted provider's "verified" proves nothing).
    fn address_of(&self, user: &UserRecord, lowered: &str, policy: &LinkingPolicy) -> (bool, bool) {
        let mut has = same_address(user.email.as_deref(), lowered);
        let mut verified = false;
        for key in &user.identities {
            if let Some(identity) = self.identities.get(key)
                && same_address(identity.email.as_deref(), lowered)
            {
                has = true;
                verified |= identity.email_verified && policy.trusts(key.0);
            }
        }
        (has, verified)
    }

    fn attach(&mut self, user_id: UserId, identity: &VerifiedIdentity) {
        let key = key_of(identity);
        let mut record = IdentityRecord {
            user_id,
            email: None,
            email_verified: false,
            email_deliverable: true,
        };
        record.refresh(identity);
        if let Some(user) = self.users.get_mut(&user_id) {
            user.identities.push(key.clone());
        }
        self.identities.insert(key, record);
    }
}

impl MemoryUserStore {
    /// An empty store holding at most [`DEFAULT_MAX_USERS`] users.
    pub fn new() -> Self {
        Self {
            max_users: DEFAULT_MAX_USERS,
            refused_full: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        }
    }

    /// Holds at most `users` users (at least 1).
    pub fn with_max_users(mut self, users: usize) -> Self {
        self.max_users = users.max(1);
        self
    }

    /// How many users it holds.
    pub fn len(&self) -> usize {
        self.lock().users.len()
    }

    /// Whether it holds no user.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most users it holds.
    pub fn max_users(&self) -> usize {
        self.max_users
    }

    /// New users refused because the store was full, since start.
    pub fn refused_full(&self) -> u64 {
        self.refused_full.load(Ordering::Relaxed)
    }

    /// [`UserError::Full`] unless there is room for one more user.
    fn room_for_one(&self, state: &State) -> Result<(), UserError> {
        if state.users.len() < self.max_users {
            return Ok(());
        }
        self.refused_full.fetch_add(1, Ordering::Relaxed);
        Err(UserError::Full {
            max_users: self.max_users,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Each change to `State` is completed before the lock is released (nothing in
        // between can panic but an allocation failure), so a poisoned lock holds a
        // consistent state.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl UserStore for MemoryUserStore {
    async fn sign_in(
        &self,
        identity: &VerifiedIdentity,
        policy: &LinkingPolicy,
    ) -> Result<SignIn, UserError> {
        check_identity(identity)?;
        let mut state = self.lock();
        let state = &mut *state;
        if let Some(known) = state.identities.get_mut(&key_of(identity)) {
            known.refresh(identity);
            let user_id = known.user_id;
            return Ok(SignIn {
                user: state.view_existing(user_id)?,
                created: false,
                linked: false,
            });
        }

        if let Some(email) = email_of(identity) {
            let lowered = email.to_lowercase();
            let subject = SubjectHash::of(&identity.provider, &identity.subject);
            let holders = state.users.iter().filter_map(|(id, user)| {
                let (has, verified) = state.address_of(user, &lowered, policy);
                has.then(|| Holder {
                    id: *id,
                    verified,
                    has_provider: user.identities.iter().any(|(p, _)| *p == identity.provider),
                    unlinked: state.has_unlinked(*id, &subject),
                })
            });
            if let Some(owner) = first_sign_in_choice(identity, policy, holders)? {
                state.may_link_more(owner)?;
                state.attach(owner, identity);
                return Ok(SignIn {
                    user: state.view_existing(owner)?,
                    created: false,
                    linked: true,
                });
            }
        }

        self.room_for_one(state)?;
        let id = UserId::new();
        let email = email_of(identity).map(str::to_owned);
        state.users.insert(
            id,
            UserRecord {
                email_verified: email.is_some() && identity.email_verified,
                email,
                name: identity.name.clone(),
                roles: vec![Role::USER],
                identities: Vec::with_capacity(1),
            },
        );
        state.attach(id, identity);
        Ok(SignIn {
            user: state.view_existing(id)?,
            created: true,
            linked: false,
        })
    }

    async fn get(&self, user_id: UserId) -> Result<Option<User>, UserError> {
        Ok(self.lock().view(user_id))
    }

    async fn find_by_identity(
        &self,
        provider: ProviderId,
        subject: &str,
    ) -> Result<Option<User>, UserError> {
        let state = self.lock();
        Ok(state
            .identities
            .get(&(provider, subject.to_owned()))
            .and_then(|identity| state.view(identity.user_id)))
    }

    async fn link(&self, user_id: UserId, identity: &VerifiedIdentity) -> Result<User, UserError> {
        check_identity(identity)?;
        let mut state = self.lock();
        let Some(user) = state.users.get(&user_id) else {
            return Err(UserError::NotFound);
        };
        let has_provider = user.identities.iter().any(|(p, _)| *p == identity.provider);
        match state.identities.get_mut(&key_of(identity)) {
            Some(known) if known.user_id == user_id => known.refresh(identity),
            Some(_) => return Err(UserError::IdentityTaken),
            None if has_provider => {
                return Err(UserError::ProviderAlreadyLinked {
                    provider: identity.provider,
                });
            }
            None => {
                state.may_link_more(user_id)?;
                state.attach(user_id, identity);
            }
        }
        // Linked on purpose: it may link by address again after a later unlink's undo.
        let subject = SubjectHash::of(&identity.provider, &identity.subject);
        if let Some(hashes) = state.unlinked.get_mut(&user_id) {
            hashes.remove(&subject);
            if hashes.is_empty() {
                state.unlinked.remove(&user_id);
            }
        }
        state.view_existing(user_id)
    }

    async fn unlink(&self, user_id: UserId, provider: ProviderId) -> Result<User, UserError> {
        let mut state = self.lock();
        let Some(user) = state.users.get_mut(&user_id) else {
            return Err(UserError::NotFound);
        };
        let Some(at) = user.identities.iter().position(|(p, _)| *p == provider) else {
            return Err(UserError::NotLinked { provider });
        };
        if user.identities.len() == 1 {
            return Err(UserError::LastIdentity);
        }
        let key = user.identities.remove(at);
        state.identities.remove(&key);
        state
            .unlinked
            .entry(user_id)
            .or_default()
            .insert(SubjectHash::of(&key.0, &key.1));
        state.view_existing(user_id)
    }

    async fn erase_identity(
        &self,
        provider: ProviderId,
        subject: &str,
    ) -> Result<Option<Erased>, UserError> {
        let mut state = self.lock();
        let key = (provider, subject.to_owned());
        // Nothing of an erased person is kept, not even that a user unlinked them.
        let hash = SubjectHash::of(&provider, subject);
        state.unlinked.retain(|_, hashes| {
            hashes.remove(&hash);
            !hashes.is_empty()
        });
        let Some(identity) = state.identities.remove(&key) else {
            return Ok(None);
        };
        let user_id = identity.user_id;
        let user_deleted = match state.users.get_mut(&user_id) {
            Some(user) => {
                user.identities.retain(|k| *k != key);
                user.identities.is_empty()
            }
            None => true,
        };
        if user_deleted {
            state.users.remove(&user_id);
            state.unlinked.remove(&user_id);
        }
        Ok(Some(Erased {
            user_id,
            user_deleted,
        }))
    }

    async fn set_email_deliverable(
        &self,
        provider: ProviderId,
        subject: &str,
        deliverable: bool,
    ) -> Result<Option<UserId>, UserError> {
        let mut state = self.lock();
        Ok(state
            .identities
            .get_mut(&(provider, subject.to_owned()))
            .map(|identity| {
                identity.email_deliverable = deliverable;
                identity.user_id
            }))
    }

    async fn email_deliverable(
        &self,
        provider: ProviderId,
        subject: &str,
    ) -> Result<Option<bool>, UserError> {
        let state = self.lock();
        Ok(state
            .identities
            .get(&(provider, subject.to_owned()))
            .map(|identity| identity.email_deliverable))
    }

    async fn set_roles(&self, user_id: UserId, roles: &[Role]) -> Result<User, UserError> {
        let mut state = self.lock();
        let Some(user) = state.users.get_mut(&user_id) else {
            return Err(UserError::NotFound);
        };
        user.roles = dedup_roles(roles);
        state.view_existing(user_id)
    }

    async fn provision(&self, user_id: UserId, roles: &[Role]) -> Result<User, UserError> {
        let mut state = self.lock();
        if !state.users.contains_key(&user_id) {
            self.room_for_one(&state)?;
        }
        state.users.entry(user_id).or_insert_with(|| UserRecord {
            email: None,
            email_verified: false,
            name: None,
            roles: dedup_roles(roles),
            identities: Vec::new(),
        });
        state.view_existing(user_id)
    }
}
