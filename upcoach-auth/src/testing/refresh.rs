//! The conformance suite every [`RefreshStore`] passes (feature `testing`).
//!
//! ```
//! use std::time::Duration;
//! use upcoach_auth::refresh::{MemoryRefreshStore, RefreshPolicy};
//! use upcoach_auth::testing::refresh::{FreshIds, refresh_store_conformance};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let policy = RefreshPolicy::default().with_grace(Duration::from_secs(10));
//! refresh_store_conformance(&MemoryRefreshStore::new(policy), &FreshIds).await;
//! # });
//! ```

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use upcoach_core::UserId;

use crate::refresh::{
    DeviceFingerprint, DeviceId, Purged, RefreshError, RefreshFamily, RefreshStore, RefreshToken,
    RevokeReason, Rotation,
};

/// Makes users the store can open families for.
#[async_trait]
pub trait UserFixture: Send + Sync {
    /// A new user.
    async fn create(&self) -> UserId;
}

/// New user ids with nothing behind them, for stores that do not check users (memory).
#[derive(Debug, Clone, Copy, Default)]
pub struct FreshIds;

#[async_trait]
impl UserFixture for FreshIds {
    async fn create(&self) -> UserId {
        UserId::new()
    }
}

/// Users inserted as bare rows into `users` (feature `postgres`), for the Postgres
/// store whose tokens reference them.
#[cfg(feature = "postgres")]
#[derive(Debug, Clone)]
pub struct PgUserRows(pub sqlx::PgPool);

#[cfg(feature = "postgres")]
#[async_trait]
impl UserFixture for PgUserRows {
    async fn create(&self) -> UserId {
        let user = UserId::new();
        sqlx::query("INSERT INTO users (id) VALUES ($1)")
            .bind(user.as_uuid())
            .execute(&self.0)
            .await
            .expect("insert a test user");
        user
    }
}

/// Checks an empty `store` with the policy it has (`grace` 0 or more; the suite
/// needs `token_ttl` ≥ 1 min, `family_lifetime` > `token_ttl` and `grace` <
/// `token_ttl / 8`): rotation chains, every error code, reuse revoking the family,
/// the grace rules, the absolute lifetime, logout, revoking a user, refusal at the
/// instant of a revocation, purging, and device binding (the other sections use
/// families bound to one device, presented from it; two sections check presentations
/// from other devices, and families that are not bound). Times only move forward from
/// section to section. Panics with a message at the first difference.
pub async fn refresh_store_conformance(store: &dyn RefreshStore, users: &dyn UserFixture) {
    let policy = *store.policy();
    assert!(
        policy.token_ttl >= Duration::from_secs(60)
            && policy.family_lifetime > policy.token_ttl
            && policy.grace < policy.token_ttl / 8,
        "the suite needs token_ttl >= 1 min, family_lifetime > token_ttl, grace < token_ttl / 8: {policy:?}"
    );
    let mut suite = Suite {
        store,
        users,
        cursor: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        span: policy.family_lifetime + policy.token_ttl + policy.grace + DAY,
        ttl: policy.token_ttl,
        lifetime: policy.family_lifetime,
        grace: policy.grace,
        device: device("conformance-device-1"),
    };
    suite.chain().await;
    suite.invalid().await;
    suite.expired().await;
    suite.absolute_lifetime().await;
    suite.reuse().await;
    if suite.grace.is_zero() {
        suite.no_grace().await;
    } else {
        suite.grace_immediate_parent().await;
        suite.grace_older_ancestor().await;
        suite.grace_after_window().await;
    }
    suite.revocation().await;
    suite.logout().await;
    suite.revoke_user().await;
    suite.purge().await;
    suite.device_binding().await;
    suite.unbound().await;
}

fn device(id: &str) -> DeviceFingerprint {
    DeviceId::parse(id)
        .expect("a valid device id")
        .fingerprint()
}

const SEC: Duration = Duration::from_secs(1);
const DAY: Duration = Duration::from_secs(86_400);

struct Suite<'a> {
    store: &'a dyn RefreshStore,
    users: &'a dyn UserFixture,
    cursor: SystemTime,
    span: Duration,
    ttl: Duration,
    lifetime: Duration,
    grace: Duration,
    /// The device every family of the other sections is bound to.
    device: DeviceFingerprint,
}

impl Suite<'_> {
    /// The start of a new section, later than anything used before.
    fn section(&mut self) -> SystemTime {
        let start = self.cursor;
        self.cursor += self.span;
        start
    }

    async fn open(&self, at: SystemTime) -> (UserId, crate::refresh::IssuedRefresh) {
        let user = self.users.create().await;
        let issued = self
            .store
            .open_family(user, Some(self.device), at)
            .await
            .expect("open a family");
        (user, issued)
    }

    async fn rotate(&self, token: &RefreshToken, at: SystemTime, what: &str) -> Rotation {
        self.store
            .rotate(token.expose(), Some(self.device), at)
            .await
            .unwrap_or_else(|e| panic!("{what}: expected a rotation, got {e:?}"))
    }

    async fn refused(&self, token: &str, at: SystemTime, code: &str, what: &str) -> RefreshError {
        self.refused_from(token, Some(self.device), at, code, what)
            .await
    }

    /// [`refused`](Self::refused), presented from `device`.
    async fn refused_from(
        &self,
        token: &str,
        device: Option<DeviceFingerprint>,
        at: SystemTime,
        code: &str,
        what: &str,
    ) -> RefreshError {
        match self.store.rotate(token, device, at).await {
            Ok(rotation) => panic!("{what}: expected {code}, got a rotation {rotation:?}"),
            Err(e) => {
                assert_eq!(e.code(), code, "{what}: {e:?}");
                assert!(!e.is_retryable(), "{what}: {code} is not retryable");
                e
            }
        }
    }

    async fn chain(&mut self) {
        let t = self.section();
        let (user, issued) = self.open(t).await;
        assert!(RefreshToken::is_well_formed(issued.token.expose()));
        assert_eq!(issued.expires_at, t + self.ttl, "a token lives token_ttl");
        assert_eq!(issued.family_expires_at, t + self.lifetime);
        assert!(!format!("{issued:?}").contains(issued.token.expose()));

        let step = self.ttl / 8;
        let mut seen = HashSet::from([issued.token.expose().to_owned()]);
        let mut current = issued.token.clone();
        for i in 1..=5u32 {
            let now = t + step * i;
            let rotation = self
                .rotate(&current, now, "rotating the newest token")
                .await;
            assert_eq!(rotation.user_id, user);
            assert_eq!(rotation.family_id, issued.family_id, "same family");
            assert!(!rotation.grace_retry);
            assert_eq!(rotation.expires_at, now + self.ttl);
            assert!(RefreshToken::is_well_formed(rotation.token.expose()));
            assert!(
                seen.insert(rotation.token.expose().to_owned()),
                "every token is new"
            );
            current = rotation.token;
        }
        assert!(
            !format!("{:?}", self.store).contains(current.expose()),
            "the store's Debug shows no token"
        );

        // A second family of the same user is independent of the first.
        let second = self
            .store
            .open_family(user, Some(self.device), t + step)
            .await
            .expect("second family");
        assert_ne!(second.family_id, issued.family_id);
        let rotation = self
            .rotate(&second.token, t + step * 2, "second family")
            .await;
        assert_eq!(rotation.family_id, second.family_id);
        self.rotate(&current, t + step * 6, "first family goes on")
            .await;
    }

    async fn invalid(&mut self) {
        let t = self.section();
        self.open(t).await;
        let unknown = RefreshToken::generate().unwrap();
        let long = "a".repeat(10_000);
        let padded = format!("{}=", &unknown.expose()[..42]);
        let non_ascii = "é".repeat(21);
        for (token, what) in [
            (unknown.expose(), "an unknown token"),
            ("", "an empty token"),
            ("short", "a short token"),
            (long.as_str(), "a 10,000-character token"),
            (padded.as_str(), "a padded token"),
            (non_ascii.as_str(), "a non-ASCII token"),
            ("a.b.c", "a JWT-shaped token"),
        ] {
            self.refused(token, t, "refresh_token_invalid", what).await;
            assert_eq!(
                self.store
                    .revoke_presented(token, UserId::new(), t)
                    .await
                    .unwrap(),
                None,
                "logout with {what} finds nothing"
            );
        }
    }

    async fn expired(&mut self) {
        let t = self.section();
        let (_, issued) = self.open(t).await;
        self.refused(
            issued.token.expose(),
            t + self.ttl,
            "refresh_token_expired",
            "a token at its expiry",
        )
        .await;

        let (_, issued) = self.open(t + SEC).await;
        self.rotate(
            &issued.token,
            t + self.ttl,
            "a token just before its expiry",
        )
        .await;
    }

    async fn absolute_lifetime(&mut self) {
        let t = self.section();
        let (_, issued) = self.open(t).await;
        let end = t + self.lifetime;
        let mut current = issued.token;
        let mut now = t;
        let mut clamped = false;
        loop {
            let next = now + self.ttl / 2;
            if next >= end {
                break;
            }
            let rotation = self
                .rotate(&current, next, "rotation within the lifetime")
                .await;
            assert_eq!(
                rotation.expires_at,
                (next + self.ttl).min(end),
                "a child never outlives its family"
            );
            clamped |= rotation.expires_at == end;
            current = rotation.token;
            now = next;
        }
        assert!(clamped, "the last children expire with the family");
        self.refused(
            current.expose(),
            end,
            "refresh_token_expired",
            "a live token at the family's end",
        )
        .await;
    }

    async fn reuse(&mut self) {
        let t = self.section();
        let (user, issued) = self.open(t).await;
        let (_, bystander) = self
            .store
            .open_family(user, Some(self.device), t)
            .await
            .map(|b| (user, b))
            .expect("second family");
        let child = self.rotate(&issued.token, t + SEC, "first use").await;
        let replay = t + SEC + self.grace;
        match self
            .refused(
                issued.token.expose(),
                replay,
                "refresh_token_reused",
                "the rotated token again",
            )
            .await
        {
            RefreshError::Reused { user_id, family_id } => {
                assert_eq!(
                    (user_id, family_id),
                    (user, issued.family_id),
                    "reuse names the user and the family"
                );
            }
            other => panic!("expected Reused, got {other:?}"),
        }
        self.refused(
            child.token.expose(),
            replay,
            "refresh_token_revoked",
            "the child after reuse of its parent",
        )
        .await;
        self.refused(
            issued.token.expose(),
            replay + SEC,
            "refresh_token_reused",
            "the rotated token a third time",
        )
        .await;
        self.rotate(&bystander.token, replay + SEC, "another family of the user")
            .await;
    }

    async fn no_grace(&mut self) {
        let t = self.section();
        let (_, issued) = self.open(t).await;
        let child = self.rotate(&issued.token, t + SEC, "first use").await;
        self.refused(
            issued.token.expose(),
            t + SEC,
            "refresh_token_reused",
            "without grace, the parent at the same instant",
        )
        .await;
        self.refused(
            child.token.expose(),
            t + SEC,
            "refresh_token_revoked",
            "the child",
        )
        .await;
    }

    async fn grace_immediate_parent(&mut self) {
        let t = self.section();
        let (user, issued) = self.open(t).await;
        let first = self.rotate(&issued.token, t + SEC, "first use").await;
        let retry_at = t + SEC + self.grace / 2;
        let second = self
            .rotate(&issued.token, retry_at, "a grace retry of the parent")
            .await;
        assert!(second.grace_retry, "flagged as a grace retry");
        assert_eq!((second.user_id, second.family_id), (user, issued.family_id));
        assert_ne!(second.token, first.token, "a sibling, not the same child");
        assert_eq!(second.expires_at, retry_at + self.ttl);
        let third = self
            .rotate(&issued.token, retry_at, "another retry within the grace")
            .await;
        assert!(third.grace_retry);

        // The client goes on with one of the children; the others are stale.
        let next = self
            .rotate(&second.token, retry_at + SEC, "using the sibling")
            .await;
        assert!(!next.grace_retry);
        self.refused(
            first.token.expose(),
            retry_at + SEC,
            "refresh_token_reused",
            "a sibling of the child that was used",
        )
        .await;
        self.refused(
            next.token.expose(),
            retry_at + SEC,
            "refresh_token_revoked",
            "the family after the stale sibling",
        )
        .await;
    }

    async fn grace_older_ancestor(&mut self) {
        let t = self.section();
        let (_, issued) = self.open(t).await;
        let child = self.rotate(&issued.token, t + SEC, "first use").await;
        let grandchild = self
            .rotate(&child.token, t + SEC + self.grace / 4, "the child's use")
            .await;
        self.refused(
            issued.token.expose(),
            t + SEC + self.grace / 2,
            "refresh_token_reused",
            "within the grace, a parent whose child was used",
        )
        .await;
        self.refused(
            grandchild.token.expose(),
            t + SEC + self.grace / 2,
            "refresh_token_revoked",
            "the newest token after the ancestor's reuse",
        )
        .await;
    }

    async fn grace_after_window(&mut self) {
        let t = self.section();
        let (_, issued) = self.open(t).await;
        let child = self.rotate(&issued.token, t + SEC, "first use").await;
        self.refused(
            issued.token.expose(),
            t + SEC + self.grace,
            "refresh_token_reused",
            "the parent at the end of the grace",
        )
        .await;
        self.refused(
            child.token.expose(),
            t + SEC + self.grace,
            "refresh_token_revoked",
            "the child",
        )
        .await;
    }

    async fn revocation(&mut self) {
        let t = self.section();
        let (_, issued) = self.open(t).await;
        assert!(
            self.store
                .revoke_family(issued.family_id, RevokeReason::Admin, t)
                .await
                .unwrap(),
            "the first revocation revokes"
        );
        assert!(
            !self
                .store
                .revoke_family(issued.family_id, RevokeReason::Admin, t)
                .await
                .unwrap(),
            "revoking twice is a no-op"
        );
        self.refused(
            issued.token.expose(),
            t,
            "refresh_token_revoked",
            "a refresh at the instant of the revocation",
        )
        .await;
        assert!(
            !self
                .store
                .revoke_family(upcoach_core::SessionId::new(), RevokeReason::Admin, t)
                .await
                .unwrap(),
            "an unknown family"
        );

        // A rotated family: its newest token stops too.
        let (_, issued) = self.open(t).await;
        let child = self.rotate(&issued.token, t + SEC, "first use").await;
        self.store
            .revoke_family(issued.family_id, RevokeReason::Admin, t + 2 * SEC)
            .await
            .unwrap();
        self.refused(
            child.token.expose(),
            t + 2 * SEC,
            "refresh_token_revoked",
            "the newest token of a revoked family",
        )
        .await;
    }

    async fn logout(&mut self) {
        let t = self.section();
        let (user, issued) = self.open(t).await;
        let other = self
            .store
            .open_family(user, Some(self.device), t)
            .await
            .expect("second family");
        let child = self.rotate(&issued.token, t + SEC, "first use").await;
        let family = RefreshFamily {
            family_id: issued.family_id,
            user_id: user,
        };
        let stranger = self.users.create().await;
        let refused = self
            .store
            .revoke_presented(child.token.expose(), stranger, t + 2 * SEC)
            .await
            .expect_err("another user's logout with this token");
        assert_eq!(refused.code(), "refresh_token_not_yours");
        let child = self
            .rotate(
                &child.token,
                t + 2 * SEC,
                "a token another user failed to revoke",
            )
            .await;
        assert_eq!(
            self.store
                .revoke_presented(child.token.expose(), user, t + 2 * SEC)
                .await
                .unwrap(),
            Some(family),
            "logout names the family"
        );
        self.refused(
            child.token.expose(),
            t + 2 * SEC,
            "refresh_token_revoked",
            "the token after logout",
        )
        .await;
        assert_eq!(
            self.store
                .revoke_presented(child.token.expose(), user, t + 3 * SEC)
                .await
                .unwrap(),
            Some(family),
            "logging out twice"
        );
        assert_eq!(
            self.store
                .revoke_presented(issued.token.expose(), user, t + 3 * SEC)
                .await
                .unwrap(),
            Some(family),
            "logout with an older token of the family"
        );
        self.rotate(&other.token, t + 3 * SEC, "the user's other session")
            .await;

        // Logout with a rotated token revokes the live line too.
        let (user, issued) = self.open(t).await;
        let child = self.rotate(&issued.token, t + SEC, "first use").await;
        self.store
            .revoke_presented(issued.token.expose(), user, t + 2 * SEC)
            .await
            .unwrap();
        self.refused(
            child.token.expose(),
            t + 2 * SEC,
            "refresh_token_revoked",
            "the newest token after logout with its parent",
        )
        .await;
    }

    async fn revoke_user(&mut self) {
        let t = self.section();
        let (user, a) = self.open(t).await;
        let b = self
            .store
            .open_family(user, Some(self.device), t)
            .await
            .unwrap();
        let c = self
            .store
            .open_family(user, Some(self.device), t)
            .await
            .unwrap();
        let b_child = self.rotate(&b.token, t + SEC, "first use").await;
        self.store
            .revoke_family(c.family_id, RevokeReason::Logout, t + SEC)
            .await
            .unwrap();
        let (_, bystander) = self.open(t).await;

        assert_eq!(
            self.store.revoke_user(user, t + 2 * SEC).await.unwrap(),
            2,
            "the user's two live families"
        );
        for (token, what) in [
            (&a.token, "the first family"),
            (&b_child.token, "the newest token of the second family"),
            (&c.token, "a family revoked before"),
        ] {
            self.refused(token.expose(), t + 2 * SEC, "refresh_token_revoked", what)
                .await;
        }
        assert_eq!(
            self.store.revoke_user(user, t + 3 * SEC).await.unwrap(),
            0,
            "nothing left to revoke"
        );
        assert_eq!(
            self.store
                .revoke_user(UserId::new(), t + 3 * SEC)
                .await
                .unwrap(),
            0,
            "an unknown user"
        );
        self.rotate(&bystander.token, t + 3 * SEC, "another user's session")
            .await;
    }

    async fn purge(&mut self) {
        let t = self.section();
        let (_, issued) = self.open(t).await;
        let child = self
            .rotate(&issued.token, t + self.ttl / 2, "first use")
            .await;

        // Nothing of a live family goes while its tokens are live.
        self.store.purge_expired(t + self.ttl / 2).await.unwrap();
        let child = self
            .rotate(&child.token, t + self.ttl / 2 + SEC, "after a purge")
            .await;

        // The first token has expired (plus the grace): it goes, the family stays.
        let later = t + self.ttl + self.grace;
        let purged = self.store.purge_expired(later).await.unwrap();
        assert!(
            purged.tokens >= 1,
            "the expired token is removed: {purged:?}"
        );
        self.refused(
            issued.token.expose(),
            later,
            "refresh_token_invalid",
            "a removed token",
        )
        .await;
        let child = self.rotate(&child.token, later, "the live line").await;

        // Past the family's end, all of it goes.
        let end = t + self.lifetime;
        let purged = self.store.purge_expired(end).await.unwrap();
        assert!(
            purged.families >= 1 && purged.tokens >= 2,
            "the family and its tokens are removed: {purged:?}"
        );
        self.refused(
            child.token.expose(),
            end,
            "refresh_token_invalid",
            "a token of a removed family",
        )
        .await;
        assert_eq!(
            self.store
                .revoke_presented(child.token.expose(), UserId::new(), end)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            self.store.purge_expired(end).await.unwrap(),
            Purged::default(),
            "purging again removes nothing"
        );
    }
    async fn device_binding(&mut self) {
        let t = self.section();
        let other = device("conformance-device-2");
        let (user, issued) = self.open(t).await;
        let (_, bystander) = self.open(t).await;
        let sibling = self
            .store
            .open_family(user, Some(self.device), t)
            .await
            .expect("the user's second family");
        let child = self.rotate(&issued.token, t + SEC, "first use").await;

        // From another device, or none: refused, and the family is revoked.
        for (presented, what) in [
            (Some(other), "the newest token from another device"),
            (
                Some(other),
                "the same again (each attempt is refused and reported)",
            ),
            (None, "the newest token with no device"),
        ] {
            match self
                .refused_from(
                    child.token.expose(),
                    presented,
                    t + 2 * SEC,
                    "device_mismatch",
                    what,
                )
                .await
            {
                RefreshError::DeviceMismatch { user_id, family_id } => assert_eq!(
                    (user_id, family_id),
                    (user, issued.family_id),
                    "{what}: the mismatch names the user and the family"
                ),
                e => panic!("{what}: expected DeviceMismatch, got {e:?}"),
            }
        }
        self.refused(
            child.token.expose(),
            t + 2 * SEC,
            "refresh_token_revoked",
            "the newest token, from its own device, after a mismatch",
        )
        .await;
        self.refused_from(
            issued.token.expose(),
            Some(other),
            t + 2 * SEC,
            "device_mismatch",
            "a rotated token from another device is a mismatch before it is reuse",
        )
        .await;
        self.rotate(&sibling.token, t + 3 * SEC, "the user's other session")
            .await;
        self.rotate(&bystander.token, t + 3 * SEC, "another user's session")
            .await;

        // An unused first token from another device revokes too.
        let (_, issued) = self.open(t).await;
        self.refused_from(
            issued.token.expose(),
            Some(other),
            t + SEC,
            "device_mismatch",
            "a first token from another device",
        )
        .await;
        self.refused(
            issued.token.expose(),
            t + SEC,
            "refresh_token_revoked",
            "the first token from its own device after that",
        )
        .await;

        // Within the grace, a retry of the parent from another device is no retry.
        if !self.grace.is_zero() {
            let (_, issued) = self.open(t).await;
            let child = self.rotate(&issued.token, t + SEC, "first use").await;
            self.refused_from(
                issued.token.expose(),
                Some(other),
                t + SEC + self.grace / 2,
                "device_mismatch",
                "a grace retry from another device",
            )
            .await;
            self.refused(
                child.token.expose(),
                t + SEC + self.grace / 2,
                "refresh_token_revoked",
                "the child after a retry from another device",
            )
            .await;
        }

        // Logout is not bound: the signed-in owner revokes from anywhere.
        let (user, issued) = self.open(t).await;
        assert_eq!(
            self.store
                .revoke_presented(issued.token.expose(), user, t + SEC)
                .await
                .unwrap(),
            Some(RefreshFamily {
                family_id: issued.family_id,
                user_id: user,
            })
        );

        // An expired token from another device is only expired: nothing changes.
        let (_, expiring) = self.open(t).await;
        let child = self
            .rotate(&expiring.token, t + self.ttl / 2, "first use")
            .await;
        self.refused_from(
            expiring.token.expose(),
            Some(other),
            t + self.ttl,
            "refresh_token_expired",
            "an expired token from another device",
        )
        .await;
        self.rotate(&child.token, t + self.ttl, "its family goes on")
            .await;
    }

    async fn unbound(&mut self) {
        let t = self.section();
        let other = device("conformance-device-2");
        let user = self.users.create().await;
        let issued = self
            .store
            .open_family(user, None, t)
            .await
            .expect("a family without a device");
        let mut current = issued.token;
        for (i, presented) in [None, Some(self.device), Some(other), None]
            .into_iter()
            .enumerate()
        {
            let rotation = self
                .store
                .rotate(current.expose(), presented, t + SEC * (i as u32 + 1))
                .await
                .unwrap_or_else(|e| {
                    panic!("a family that is not bound rotates from {presented:?}: {e:?}")
                });
            assert_eq!(rotation.family_id, issued.family_id);
            current = rotation.token;
        }
        self.refused_from(
            RefreshToken::generate().unwrap().expose(),
            Some(other),
            t + 5 * SEC,
            "refresh_token_invalid",
            "an unknown token from any device",
        )
        .await;
        assert!(
            !format!("{:?}", self.store).contains("conformance-device"),
            "the store's Debug shows no device id"
        );
    }
}
