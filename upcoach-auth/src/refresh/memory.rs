//! [`MemoryRefreshStore`]: refresh-token families in one process, behind a mutex.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use upcoach_core::{SessionId, UserId};

use super::{
    DeviceFingerprint, IssuedRefresh, Observed, Purged, RefreshError, RefreshFamily, RefreshPolicy,
    RefreshStore, RefreshToken, RevokeReason, Rotation, TokenHash, Verdict, decide, later,
    to_micros,
};

/// How many expired entries one call removes on its way out, at most. Each call adds at
/// most two entries, so cleanup keeps up with any rate of calls.
const SWEEP_PER_CALL: usize = 64;

/// The default most families (sign-in sessions) a [`MemoryRefreshStore`] holds: 100,000
/// families with one token each measured 100 MiB.
pub const DEFAULT_MAX_FAMILIES: usize = 100_000;

/// The default most tokens a [`MemoryRefreshStore`] holds, over all families (each
/// refresh adds one; a rotated token is kept until it expires, to catch its reuse).
pub const DEFAULT_MAX_TOKENS: usize = 500_000;

/// What a [`MemoryRefreshStore`] holds and what its bounds did, from
/// [`MemoryRefreshStore::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct MemoryRefreshStats {
    /// Families held (expired ones not yet removed included).
    pub families: usize,
    /// Tokens held (expired ones not yet removed included).
    pub tokens: usize,
    /// The most families held ([`MemoryRefreshStore::with_max_families`]).
    pub max_families: usize,
    /// The most tokens held ([`MemoryRefreshStore::with_max_tokens`]).
    pub max_tokens: usize,
    /// Revoked families removed before their end to make room, since start.
    pub evicted_revoked: u64,
    /// Sign-ins and refreshes refused with [`RefreshError::Full`], since start.
    pub refused_full: u64,
}

/// Refresh-token families in this process: the embedded default, and the reference for
/// the Postgres store's behaviour.
///
/// One mutex guards everything, so every call is atomic: of two rotations of one token
/// one wins, and a revocation is complete when it returns. Expired data goes away on its
/// own: every call removes up to 64 entries whose time has passed (oldest first, from an
/// index by expiry), and [`RefreshStore::purge_expired`] removes all of them.
///
/// **Bounded**: at most [`DEFAULT_MAX_FAMILIES`] families and [`DEFAULT_MAX_TOKENS`]
/// tokens ([`with_max_families`](Self::with_max_families),
/// [`with_max_tokens`](Self::with_max_tokens)). A sign-in or refresh that finds the
/// store full first removes everything expired, then whole *revoked* families, oldest
/// revocation first (counted in [`MemoryRefreshStats::evicted_revoked`]): their tokens
/// then answer [`RefreshError::Invalid`] instead of `Revoked` or `Reused`, refused all
/// the same, only without the security event a replay would have been worth. If the
/// live families still fill it, the call fails with [`RefreshError::Full`] (503
/// `refresh_store_full` at the HTTP face, counted in
/// [`MemoryRefreshStats::refused_full`]) and changes nothing: a refused refresh leaves
/// the presented token as it was, to be presented again later. Live sessions are never
/// evicted to make room, and neither are the rotated tokens of a live family: they are
/// what catches a stolen token's reuse, and a store that dropped them under pressure
/// would let an attacker who can sign in often enough erase the evidence.
///
/// `PgRefreshStore` has no such bound: its table grows with the database, and its
/// purge of expired rows is the only thing that shrinks it. Both answer the same to
/// every call short of a full memory store.
///
/// ```
/// use std::time::SystemTime;
/// use upcoach_auth::refresh::{MemoryRefreshStore, RefreshPolicy, RefreshStore};
/// use upcoach_core::UserId;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = MemoryRefreshStore::new(RefreshPolicy::default());
/// let issued = store.open_family(UserId::new(), None, SystemTime::now()).await.unwrap();
/// assert_eq!((store.families(), store.tokens()), (1, 1));
/// # });
/// ```
pub struct MemoryRefreshStore {
    policy: RefreshPolicy,
    max_families: usize,
    max_tokens: usize,
    state: Mutex<State>,
}

impl fmt::Debug for MemoryRefreshStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryRefreshStore")
            .field("policy", &self.policy)
            .field("families", &state.families.len())
            .field("tokens", &state.tokens.len())
            .field("max_families", &self.max_families)
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

impl Default for MemoryRefreshStore {
    fn default() -> Self {
        Self::new(RefreshPolicy::default())
    }
}

#[derive(Default)]
struct State {
    tokens: HashMap<TokenHash, TokenEntry>,
    families: HashMap<SessionId, FamilyEntry>,
    by_user: HashMap<UserId, HashSet<SessionId>>,
    /// Every token and family by the time it may be removed; the `u64` keeps keys unique.
    expiry: BTreeMap<(SystemTime, u64), Expiring>,
    /// Revoked families, oldest revocation first: the first to go when the store is full.
    revoked: BTreeMap<u64, SessionId>,
    serial: u64,
    evicted_revoked: u64,
    refused_full: u64,
}

#[derive(Clone, Copy)]
enum Expiring {
    Token(TokenHash),
    Family(SessionId),
}

struct TokenEntry {
    family_id: SessionId,
    parent: Option<TokenHash>,
    expires_at: SystemTime,
    rotated_at: Option<SystemTime>,
    expiry_key: (SystemTime, u64),
}

struct FamilyEntry {
    user_id: UserId,
    expires_at: SystemTime,
    expiry_key: (SystemTime, u64),
    /// Its key in [`State::revoked`] once revoked.
    revoked: Option<u64>,
    /// The device the family is bound to, if it is.
    device: Option<DeviceFingerprint>,
    tokens: HashSet<TokenHash>,
    /// Parent → its child that was exchanged (by the sibling rule there is at most one).
    advanced: HashMap<TokenHash, TokenHash>,
}

impl MemoryRefreshStore {
    /// An empty store applying `policy`, holding at most [`DEFAULT_MAX_FAMILIES`]
    /// families and [`DEFAULT_MAX_TOKENS`] tokens.
    pub fn new(policy: RefreshPolicy) -> Self {
        Self {
            policy,
            max_families: DEFAULT_MAX_FAMILIES,
            max_tokens: DEFAULT_MAX_TOKENS,
            state: Mutex::new(State::default()),
        }
    }

    /// Holds at most `families` families (sign-in sessions; at least 1).
    pub fn with_max_families(mut self, families: usize) -> Self {
        self.max_families = families.max(1);
        self
    }

    /// Holds at most `tokens` tokens over all families (at least 1).
    pub fn with_max_tokens(mut self, tokens: usize) -> Self {
        self.max_tokens = tokens.max(1);
        self
    }

    /// What the store holds, its bounds, and what they did.
    pub fn stats(&self) -> MemoryRefreshStats {
        let state = self.lock();
        MemoryRefreshStats {
            families: state.families.len(),
            tokens: state.tokens.len(),
            max_families: self.max_families,
            max_tokens: self.max_tokens,
            evicted_revoked: state.evicted_revoked,
            refused_full: state.refused_full,
        }
    }

    /// How many families are held (expired ones not yet removed included).
    pub fn families(&self) -> usize {
        self.lock().families.len()
    }

    /// How many tokens are held (expired ones not yet removed included).
    pub fn tokens(&self) -> usize {
        self.lock().tokens.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change below is completed before anything that could panic, so a
        // poisoned lock still guards a consistent state.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    fn key(&mut self, at: SystemTime, what: Expiring) -> (SystemTime, u64) {
        self.serial += 1;
        let key = (at, self.serial);
        self.expiry.insert(key, what);
        key
    }

    /// Adds a token to an existing family.
    fn insert_token(
        &mut self,
        hash: TokenHash,
        family_id: SessionId,
        parent: Option<TokenHash>,
        expires_at: SystemTime,
        policy: &RefreshPolicy,
    ) {
        let expiry_key = self.key(later(expires_at, policy.grace), Expiring::Token(hash));
        self.tokens.insert(
            hash,
            TokenEntry {
                family_id,
                parent,
                expires_at,
                rotated_at: None,
                expiry_key,
            },
        );
        if let Some(family) = self.families.get_mut(&family_id) {
            family.tokens.insert(hash);
        }
    }

    /// What the store knows of the token `hash`, presented from `device`.
    fn observe(
        &self,
        hash: &TokenHash,
        device: Option<&DeviceFingerprint>,
    ) -> Option<(Observed, SessionId, UserId)> {
        let token = self.tokens.get(hash)?;
        let family = self.families.get(&token.family_id)?;
        let sibling_rotated = token
            .parent
            .and_then(|parent| family.advanced.get(&parent))
            .is_some_and(|child| child != hash);
        let observed = Observed {
            expires_at: token.expires_at,
            family_expires_at: family.expires_at,
            rotated_at: token.rotated_at,
            revoked: family.revoked.is_some(),
            device_accepted: DeviceFingerprint::accepts(family.device.as_ref(), device),
            child_rotated: family.advanced.contains_key(hash),
            sibling_rotated,
        };
        Some((observed, token.family_id, family.user_id))
    }

    fn revoke(&mut self, family_id: SessionId) -> bool {
        match self.families.get_mut(&family_id) {
            Some(family) if family.revoked.is_none() => {
                self.serial += 1;
                family.revoked = Some(self.serial);
                self.revoked.insert(self.serial, family_id);
                true
            }
            _ => false,
        }
    }

    /// Makes room for a new family and its first token, or for one more token when
    /// `family` is false: removes everything expired, then revoked families, oldest
    /// revocation first. [`RefreshError::Full`] when live families still fill it.
    fn make_room(
        &mut self,
        family: bool,
        now: SystemTime,
        max_families: usize,
        max_tokens: usize,
    ) -> Result<(), RefreshError> {
        let full = |state: &Self| {
            (family && state.families.len() >= max_families) || state.tokens.len() >= max_tokens
        };
        if !full(self) {
            return Ok(());
        }
        self.sweep(now, usize::MAX);
        while full(self) {
            let Some((_, family_id)) = self.revoked.pop_first() else {
                break;
            };
            if self.remove_family(family_id) {
                self.evicted_revoked += 1;
            }
        }
        if full(self) {
            self.refused_full += 1;
            return Err(RefreshError::Full {
                families: max_families,
                tokens: max_tokens,
            });
        }
        Ok(())
    }

    /// Removes a family, its tokens and every index entry of theirs; `true` if it was
    /// held.
    fn remove_family(&mut self, family_id: SessionId) -> bool {
        let Some(family) = self.families.remove(&family_id) else {
            return false;
        };
        self.expiry.remove(&family.expiry_key);
        if let Some(key) = family.revoked {
            self.revoked.remove(&key);
        }
        for hash in &family.tokens {
            if let Some(token) = self.tokens.remove(hash) {
                self.expiry.remove(&token.expiry_key);
            }
        }
        if let Some(families) = self.by_user.get_mut(&family.user_id) {
            families.remove(&family_id);
            if families.is_empty() {
                self.by_user.remove(&family.user_id);
            }
        }
        true
    }

    /// Removes up to `budget` entries whose removal time is at or before `now`.
    fn sweep(&mut self, now: SystemTime, budget: usize) -> Purged {
        let mut purged = Purged::default();
        for _ in 0..budget {
            let Some(entry) = self.expiry.first_entry() else {
                break;
            };
            if entry.key().0 > now {
                break;
            }
            match entry.remove() {
                Expiring::Token(hash) => {
                    if self.remove_token(&hash) {
                        purged.tokens += 1;
                    }
                }
                Expiring::Family(family_id) => {
                    let tokens = self.families.get(&family_id).map(|f| f.tokens.len());
                    if let Some(tokens) = tokens
                        && self.remove_family(family_id)
                    {
                        purged.families += 1;
                        purged.tokens += tokens as u64;
                    }
                }
            }
        }
        purged
    }

    fn remove_token(&mut self, hash: &TokenHash) -> bool {
        let Some(token) = self.tokens.remove(hash) else {
            return false;
        };
        if let Some(family) = self.families.get_mut(&token.family_id) {
            family.tokens.remove(hash);
            if let Some(parent) = token.parent
                && family.advanced.get(&parent) == Some(hash)
            {
                // The record that the parent's line moved on lives as long as the
                // child that moved it (as the child's row does in Postgres): the
                // siblings' staleness depends on it, the parent's own row does not.
                family.advanced.remove(&parent);
            }
        }
        true
    }
}

#[async_trait]
impl RefreshStore for MemoryRefreshStore {
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
        let (expires_at, family_expires_at) = self.policy.first_expiries(now);
        let mut state = self.lock();
        state.make_room(true, now, self.max_families, self.max_tokens)?;
        let expiry_key = state.key(family_expires_at, Expiring::Family(family_id));
        state.families.insert(
            family_id,
            FamilyEntry {
                user_id: user,
                expires_at: family_expires_at,
                expiry_key,
                revoked: None,
                device,
                tokens: HashSet::new(),
                advanced: HashMap::new(),
            },
        );
        state.by_user.entry(user).or_default().insert(family_id);
        state.insert_token(token.hash(), family_id, None, expires_at, &self.policy);
        state.sweep(now, SWEEP_PER_CALL);
        Ok(IssuedRefresh {
            token,
            family_id,
            expires_at,
            family_expires_at,
        })
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
        let hash = TokenHash::of(presented);
        let child = RefreshToken::generate()?;
        let mut state = self.lock();
        let result = (|| {
            let (observed, family_id, user_id) = state
                .observe(&hash, device.as_ref())
                .ok_or(RefreshError::Invalid)?;
            let verdict = decide(&observed, &self.policy, now);
            match verdict {
                Verdict::Rotate | Verdict::GraceRetry => {
                    // Before any change: refused, the presented token stays as it was.
                    state.make_room(false, now, self.max_families, self.max_tokens)?;
                    if verdict == Verdict::Rotate {
                        let token = state.tokens.get_mut(&hash).expect("observed above");
                        token.rotated_at = Some(now);
                        let parent = token.parent;
                        let family = state.families.get_mut(&family_id).expect("observed");
                        if let Some(parent) = parent {
                            family.advanced.insert(parent, hash);
                        }
                    }
                    let expires_at = to_micros(later(now, self.policy.token_ttl))
                        .min(observed.family_expires_at);
                    state.insert_token(
                        child.hash(),
                        family_id,
                        Some(hash),
                        expires_at,
                        &self.policy,
                    );
                    Ok(Rotation {
                        user_id,
                        family_id,
                        token: child,
                        expires_at,
                        grace_retry: verdict == Verdict::GraceRetry,
                    })
                }
                Verdict::Reuse => {
                    state.revoke(family_id);
                    Err(RefreshError::Reused { user_id, family_id })
                }
                Verdict::DeviceMismatch => {
                    state.revoke(family_id);
                    Err(RefreshError::DeviceMismatch { user_id, family_id })
                }
                Verdict::Revoked => Err(RefreshError::Revoked),
                Verdict::Expired => Err(RefreshError::Expired),
            }
        })();
        state.sweep(now, SWEEP_PER_CALL);
        result
    }

    async fn revoke_family(
        &self,
        family: SessionId,
        _reason: RevokeReason,
        now: SystemTime,
    ) -> Result<bool, RefreshError> {
        let mut state = self.lock();
        let revoked = state.revoke(family);
        state.sweep(to_micros(now), SWEEP_PER_CALL);
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
        let mut state = self.lock();
        let found = state.observe(&hash, None);
        if let Some((_, _, user_id)) = found
            && user_id != owner
        {
            return Err(RefreshError::NotOwner);
        }
        let found = found.map(|(_, family_id, user_id)| {
            state.revoke(family_id);
            RefreshFamily { family_id, user_id }
        });
        state.sweep(to_micros(now), SWEEP_PER_CALL);
        Ok(found)
    }

    async fn revoke_user(&self, user: UserId, now: SystemTime) -> Result<u64, RefreshError> {
        let mut state = self.lock();
        let families: Vec<SessionId> = state
            .by_user
            .get(&user)
            .map(|families| families.iter().copied().collect())
            .unwrap_or_default();
        let mut revoked = 0;
        for family in families {
            if state.revoke(family) {
                revoked += 1;
            }
        }
        state.sweep(to_micros(now), SWEEP_PER_CALL);
        Ok(revoked)
    }

    async fn purge_expired(&self, now: SystemTime) -> Result<Purged, RefreshError> {
        Ok(self.lock().sweep(to_micros(now), usize::MAX))
    }
}
