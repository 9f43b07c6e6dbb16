//! The bounds of the in-memory user and refresh-token stores: each flood is pushed past
//! its cap, and the tests assert the exact count held, the error of the refused call,
//! that nothing live was dropped, and how room comes back.
//!
//! `cargo test -p upcoach-auth --test bounds`

use std::time::{Duration, SystemTime};

use upcoach_auth::ProviderId;
use upcoach_auth::refresh::{
    DEFAULT_MAX_FAMILIES, DEFAULT_MAX_TOKENS, MemoryRefreshStore, RefreshError, RefreshPolicy,
    RefreshStore, RevokeReason,
};
use upcoach_auth::testing::refresh::{FreshIds, refresh_store_conformance};
use upcoach_auth::testing::users::an_identity;
use upcoach_auth::testing::users::user_store_conformance;
use upcoach_auth::users::{
    DEFAULT_MAX_USERS, LinkingPolicy, MAX_UNLINKED_PER_USER, MemoryUserStore, UserError, UserStore,
};
use upcoach_core::UserId;

#[test]
fn the_defaults_are_the_documented_ones() {
    let users = MemoryUserStore::new();
    assert_eq!(users.max_users(), DEFAULT_MAX_USERS);
    assert_eq!(DEFAULT_MAX_USERS, 10_000);
    let stats = MemoryRefreshStore::new(RefreshPolicy::default()).stats();
    assert_eq!(
        (stats.max_families, stats.max_tokens),
        (DEFAULT_MAX_FAMILIES, DEFAULT_MAX_TOKENS)
    );
    assert_eq!(
        (DEFAULT_MAX_FAMILIES, DEFAULT_MAX_TOKENS),
        (100_000, 500_000)
    );
}

#[tokio::test]
async fn a_full_user_store_refuses_new_accounts_and_serves_existing_ones() {
    let store = MemoryUserStore::new().with_max_users(3);
    let policy = LinkingPolicy::default();
    let mut users = Vec::new();
    for i in 0..3 {
        let email = format!("user{i}@bounds.example");
        let signed = store
            .sign_in(
                &an_identity(ProviderId::GOOGLE, &format!("g-{i}"), Some(&email)),
                &policy,
            )
            .await
            .unwrap();
        assert!(signed.created);
        users.push(signed.user);
    }

    // A flood of new identities: each refused, none kept.
    for i in 0..50 {
        let new = an_identity(ProviderId::GOOGLE, &format!("flood-{i}"), None);
        match store.sign_in(&new, &policy).await {
            Err(e @ UserError::Full { max_users: 3 }) => {
                assert_eq!(e.code(), "user_store_full");
                assert!(!e.is_retryable(), "retrying does not make room");
                assert!(e.to_string().contains("no new account"), "{e}");
            }
            other => panic!("a full store: {other:?}"),
        }
    }
    assert_eq!(store.len(), 3);
    assert_eq!(store.refused_full(), 50);
    assert!(matches!(
        store.provision(UserId::new(), &[]).await,
        Err(UserError::Full { .. })
    ));
    assert_eq!(store.refused_full(), 51);

    // Everyone with an account keeps signing in, linking (by address or on purpose)
    // and being provisioned.
    let again = store
        .sign_in(
            &an_identity(ProviderId::GOOGLE, "g-0", Some("user0@bounds.example")),
            &policy,
        )
        .await
        .unwrap();
    assert_eq!((again.user.id, again.created), (users[0].id, false));
    let linked = store
        .sign_in(
            &an_identity(ProviderId::APPLE, "a-1", Some("user1@bounds.example")),
            &policy,
        )
        .await
        .unwrap();
    assert!(linked.linked && linked.user.id == users[1].id);
    let facebook = an_identity(ProviderId::FACEBOOK, "f-2", None);
    store.link(users[2].id, &facebook).await.unwrap();
    store.provision(users[2].id, &[]).await.unwrap();
    assert_eq!(store.len(), 3);

    // Erasing a user's last identity makes room for one new account.
    store
        .erase_identity(ProviderId::GOOGLE, "g-0")
        .await
        .unwrap()
        .filter(|erased| erased.user_deleted)
        .expect("g-0 was the user's only identity");
    assert_eq!(store.len(), 2);
    let newcomer = an_identity(ProviderId::GOOGLE, "newcomer", None);
    assert!(store.sign_in(&newcomer, &policy).await.unwrap().created);
    let late = an_identity(ProviderId::GOOGLE, "late", None);
    assert!(matches!(
        store.sign_in(&late, &policy).await,
        Err(UserError::Full { max_users: 3 })
    ));
    assert_eq!(store.len(), 3);
}

/// Link and unlink cycles with fresh identities grow the list of what a user unlinked
/// (kept so that those identities never join the account by address again). At
/// [`MAX_UNLINKED_PER_USER`] nothing more is linked to that user, by hand or by
/// address; what is linked stays, unlinking still works, nothing is forgotten, and
/// other users are not affected.
#[tokio::test]
async fn an_unlink_flood_stops_linking_at_the_cap_and_forgets_no_unlink() {
    let store = MemoryUserStore::new();
    let policy = LinkingPolicy::default();
    let email = "flood@bounds.example";
    let owner = store
        .sign_in(
            &an_identity(ProviderId::APPLE, "a-owner", Some(email)),
            &policy,
        )
        .await
        .unwrap()
        .user;
    for i in 0..MAX_UNLINKED_PER_USER {
        let google = an_identity(ProviderId::GOOGLE, &format!("g-{i}"), Some(email));
        store.link(owner.id, &google).await.unwrap();
        store.unlink(owner.id, ProviderId::GOOGLE).await.unwrap();
    }
    let next = an_identity(ProviderId::GOOGLE, "g-next", Some(email));
    let refused = store.link(owner.id, &next).await.unwrap_err();
    assert!(
        matches!(refused, UserError::TooManyUnlinked { max } if max == MAX_UNLINKED_PER_USER),
        "{refused:?}"
    );
    assert_eq!(refused.code(), "too_many_unlinked_identities");
    assert_eq!(
        store.get(owner.id).await.unwrap().unwrap().providers,
        [ProviderId::APPLE]
    );
    // Not by address either: a new verified identity with the owner's address is not
    // attached to the owner (the default policy would link it).
    let by_address = store.sign_in(&next, &policy).await;
    assert!(
        matches!(by_address, Err(UserError::TooManyUnlinked { .. })),
        "{by_address:?}"
    );
    assert_eq!(
        store
            .find_by_identity(ProviderId::GOOGLE, "g-next")
            .await
            .unwrap(),
        None
    );
    // Every unlink is remembered: an old one is still not linked back by address.
    let old = store
        .sign_in(
            &an_identity(ProviderId::GOOGLE, "g-0", Some(email)),
            &policy,
        )
        .await;
    assert!(
        !matches!(&old, Ok(signed) if signed.user.id == owner.id),
        "an unlinked identity joined the account by address: {old:?}"
    );
    // What is linked keeps working, and other users are not affected.
    let again = store
        .sign_in(
            &an_identity(ProviderId::APPLE, "a-owner", Some(email)),
            &policy,
        )
        .await
        .unwrap();
    assert_eq!(again.user.id, owner.id);
    let other = store
        .sign_in(
            &an_identity(ProviderId::APPLE, "a-other", Some("other@bounds.example")),
            &policy,
        )
        .await
        .unwrap()
        .user;
    store
        .link(other.id, &an_identity(ProviderId::GOOGLE, "g-other", None))
        .await
        .unwrap();
    store.unlink(other.id, ProviderId::GOOGLE).await.unwrap();
    // Erasing one unlinked person makes room for one link.
    store
        .erase_identity(ProviderId::GOOGLE, "g-1")
        .await
        .unwrap();
    store.link(owner.id, &next).await.unwrap();
}

#[tokio::test]
async fn a_bounded_user_store_still_conforms() {
    // The conformance suite makes fewer than 100 users; a cap that it never reaches
    // changes nothing it can see.
    user_store_conformance(&MemoryUserStore::new().with_max_users(100)).await;
}

#[tokio::test]
async fn a_sign_in_flood_stops_at_the_family_cap_and_live_sessions_keep_refreshing() {
    let store = MemoryRefreshStore::new(RefreshPolicy::default()).with_max_families(100);
    let now = SystemTime::now();
    let mut live = Vec::new();
    let mut refused = 0;
    for _ in 0..10_000 {
        match store.open_family(UserId::new(), None, now).await {
            Ok(issued) => live.push(issued),
            Err(e @ RefreshError::Full { families: 100, .. }) => {
                assert_eq!(e.code(), "refresh_store_full");
                assert!(e.is_retryable(), "sessions end, making room");
                refused += 1;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!((live.len(), refused), (100, 9_900));
    let stats = store.stats();
    assert_eq!((stats.families, stats.tokens), (100, 100));
    assert_eq!((stats.refused_full, stats.evicted_revoked), (9_900, 0));

    // No live session was pushed out: each one refreshes.
    for issued in &mut live {
        let rotation = store
            .rotate(issued.token.expose(), None, now)
            .await
            .unwrap();
        issued.token = rotation.token;
    }
    assert_eq!(store.stats().tokens, 200);
}

#[tokio::test]
async fn revoked_then_expired_families_make_room_and_live_ones_never_do() {
    let policy = RefreshPolicy::default().with_family_lifetime(Duration::from_secs(3600));
    let store = MemoryRefreshStore::new(policy).with_max_families(3);
    let start = SystemTime::now();
    let user = UserId::new();
    let a = store.open_family(user, None, start).await.unwrap();
    let b = store.open_family(user, None, start).await.unwrap();
    let later = start + Duration::from_secs(60);
    let c = store.open_family(user, None, later).await.unwrap();
    assert!(matches!(
        store.open_family(user, None, later).await,
        Err(RefreshError::Full { .. })
    ));

    // A revoked session is the first to go: its token is then unknown, still refused.
    assert!(
        store
            .revoke_family(b.family_id, RevokeReason::Logout, later)
            .await
            .unwrap()
    );
    let d = store.open_family(user, None, later).await.unwrap();
    let stats = store.stats();
    assert_eq!((stats.families, stats.evicted_revoked), (3, 1));
    assert!(matches!(
        store.rotate(b.token.expose(), None, later).await,
        Err(RefreshError::Invalid)
    ));
    assert!(matches!(
        store.open_family(user, None, later).await,
        Err(RefreshError::Full { .. })
    ));

    // Past the end of the first family (not yet swept): it makes room, the others stay.
    let past_a = start + Duration::from_secs(3600);
    store.open_family(user, None, past_a).await.unwrap();
    assert_eq!(store.stats().families, 3);
    assert!(matches!(
        store.rotate(a.token.expose(), None, past_a).await,
        Err(RefreshError::Invalid)
    ));
    for live in [&c, &d] {
        store
            .rotate(live.token.expose(), None, past_a)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_refresh_refused_at_the_token_cap_changes_nothing_and_works_once_there_is_room() {
    let store = MemoryRefreshStore::new(RefreshPolicy::default())
        .with_max_families(10)
        .with_max_tokens(4);
    let now = SystemTime::now();
    let user = UserId::new();
    let a = store.open_family(user, None, now).await.unwrap();
    let b = store.open_family(user, None, now).await.unwrap();
    let a1 = store.rotate(a.token.expose(), None, now).await.unwrap();
    let a2 = store.rotate(a1.token.expose(), None, now).await.unwrap();
    assert_eq!(store.stats().tokens, 4);

    // Full of live families and their rotated tokens (kept to catch reuse): refused.
    match store.rotate(a2.token.expose(), None, now).await {
        Err(e @ RefreshError::Full { tokens: 4, .. }) => {
            assert_eq!(e.code(), "refresh_store_full");
        }
        other => panic!("a full store: {other:?}"),
    }
    assert!(matches!(
        store.open_family(user, None, now).await,
        Err(RefreshError::Full { .. })
    ));
    assert_eq!(store.stats().refused_full, 2);
    // Rotated tokens are still caught as reuse (the family is revoked)...
    assert!(matches!(
        store.rotate(a.token.expose(), None, now).await,
        Err(RefreshError::Reused { .. })
    ));
    // ...which frees family a's three tokens at the next call that needs room.
    let b1 = store.rotate(b.token.expose(), None, now).await.unwrap();
    let stats = store.stats();
    assert_eq!(
        (stats.families, stats.tokens, stats.evicted_revoked),
        (1, 2, 1)
    );
    // The refused token was left as it was: b's line goes on, and b's parent is reuse.
    store.rotate(b1.token.expose(), None, now).await.unwrap();
    assert!(matches!(
        store.rotate(b.token.expose(), None, now).await,
        Err(RefreshError::Reused { .. })
    ));
}

#[tokio::test]
async fn a_refused_rotation_leaves_the_presented_token_good() {
    let store = MemoryRefreshStore::new(RefreshPolicy::default())
        .with_max_families(10)
        .with_max_tokens(2);
    let now = SystemTime::now();
    let a = store.open_family(UserId::new(), None, now).await.unwrap();
    let b = store.open_family(UserId::new(), None, now).await.unwrap();
    assert!(matches!(
        store.rotate(a.token.expose(), None, now).await,
        Err(RefreshError::Full { .. })
    ));
    // Not marked rotated: once there is room, presenting it again rotates, not reuse.
    store
        .revoke_family(b.family_id, RevokeReason::Logout, now)
        .await
        .unwrap();
    store.rotate(a.token.expose(), None, now).await.unwrap();
}

#[tokio::test]
async fn a_bounded_refresh_store_still_conforms() {
    let store = MemoryRefreshStore::new(RefreshPolicy::default())
        .with_max_families(1_000)
        .with_max_tokens(2_000);
    refresh_store_conformance(&store, &FreshIds).await;
    let stats = store.stats();
    assert_eq!(stats.refused_full, 0, "{stats:?}");
}

#[tokio::test]
async fn a_flood_of_new_addresses_tracks_at_most_max_keys_and_keeps_the_watched_ones() {
    use upcoach_auth::threat::{DetectorState, MemoryDetectorState, Observation};
    let state = MemoryDetectorState::new(100);
    let at = SystemTime::now();
    let window = Duration::from_secs(600);
    let seen = |subject: String, member: &'static str, at: SystemTime| {
        let state = &state;
        async move {
            let observation = Observation::new("failed_logins", &subject, member, at, window, 50);
            state.observe(&observation).await.unwrap()
        }
    };
    for i in 0..100 {
        assert_eq!(seen(format!("ip:10.0.0.{i}"), "a", at).await.count, 1);
    }
    // 10,000 more addresses within the window: none tracked, each counted as such.
    for i in 0..10_000 {
        assert_eq!(seen(format!("ip:10.1.{i}"), "a", at).await.count, 0);
    }
    assert_eq!((state.len(), state.untracked()), (100, 10_000));
    // The addresses already watched keep being counted.
    assert_eq!(seen("ip:10.0.0.7".into(), "b", at).await.count, 2);
    // Once their windows have passed, they make room.
    let later = at + window + Duration::from_secs(1);
    assert_eq!(seen("ip:10.2.0.1".into(), "a", later).await.count, 1);
    assert_eq!(state.len(), 1);
}
