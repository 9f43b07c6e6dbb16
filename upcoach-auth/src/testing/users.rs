//! The conformance suite every [`UserStore`] passes (feature `testing`).
//!
//! ```
//! use upcoach_auth::users::MemoryUserStore;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! upcoach_auth::testing::users::user_store_conformance(&MemoryUserStore::new()).await;
//! # });
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use upcoach_core::{Role, UserId};

use crate::users::{Erased, LinkingPolicy, SignIn, User, UserError, UserStore};
use crate::{ProviderId, VerifiedIdentity};

const APPLE: ProviderId = ProviderId::APPLE;
const FACEBOOK: ProviderId = ProviderId::FACEBOOK;
const GOOGLE: ProviderId = ProviderId::GOOGLE;

/// Checks an empty `store` (its own schema or instance): sign-in by (provider, subject)
/// whatever the address says, automatic linking only by a verified address from a
/// trusted provider to exactly one user who holds it verified, a new user when only
/// unverified holders have it, `account_exists` otherwise, explicit linking and unlinking with their refusals, roles, invalid
/// identities, and concurrent first sign-ins and unlinks. Panics with a message at the
/// first difference.
pub async fn user_store_conformance(store: &dyn UserStore) {
    signs_in_by_provider_and_subject(store).await;
    links_by_verified_address(store).await;
    refuses_to_link_what_it_cannot_trust(store).await;
    links_and_unlinks_explicitly(store).await;
    sets_roles(store).await;
    provisions_users_without_identities(store).await;
    refuses_invalid_identities(store).await;
    concurrent_first_sign_ins_make_one_user(store).await;
    concurrent_unlinks_keep_one_identity(store).await;
    erases_identities_and_their_last_user(store).await;
    an_unlink_sticks_until_the_user_links_again(store).await;
    an_untrusted_providers_verified_address_captures_no_one(store).await;
    tracks_whether_addresses_are_deliverable(store).await;
}

fn identity(
    provider: ProviderId,
    subject: &str,
    email: Option<&str>,
    email_verified: bool,
) -> VerifiedIdentity {
    VerifiedIdentity {
        provider,
        subject: subject.to_owned(),
        email: email.map(str::to_owned),
        email_verified,
        name: None,
        expires_at: None,
    }
}

/// An identity of `provider`'s `subject`, its address (if any) verified: what tests of
/// a user store sign in with.
///
/// ```
/// use upcoach_auth::ProviderId;
/// use upcoach_auth::testing::users::an_identity;
///
/// let ada = an_identity(ProviderId::GOOGLE, "g-1", Some("ada@example.test"));
/// assert!(ada.email_verified);
/// assert!(!an_identity(ProviderId::GOOGLE, "g-2", None).email_verified);
/// ```
pub fn an_identity(provider: ProviderId, subject: &str, email: Option<&str>) -> VerifiedIdentity {
    identity(provider, subject, email, email.is_some())
}

fn verified(provider: ProviderId, subject: &str, email: &str) -> VerifiedIdentity {
    identity(provider, subject, Some(email), true)
}

fn anonymous(provider: ProviderId, subject: &str) -> VerifiedIdentity {
    identity(provider, subject, None, false)
}

async fn sign_in(store: &dyn UserStore, identity: &VerifiedIdentity) -> SignIn {
    store
        .sign_in(identity, &LinkingPolicy::default())
        .await
        .unwrap_or_else(|e| panic!("sign-in of {identity:?}: {e:?}"))
}

async fn refused(store: &dyn UserStore, identity: &VerifiedIdentity, policy: &LinkingPolicy) {
    match store.sign_in(identity, policy).await {
        Err(UserError::AccountExists) => {}
        other => panic!("{identity:?} should be refused with account_exists, got {other:?}"),
    }
    assert_eq!(
        store
            .find_by_identity(identity.provider, &identity.subject)
            .await
            .unwrap(),
        None,
        "a refused identity is not stored"
    );
}

async fn signs_in_by_provider_and_subject(store: &dyn UserStore) {
    assert_eq!(store.get(UserId::new()).await.unwrap(), None);
    assert_eq!(
        store.find_by_identity(GOOGLE, "nobody").await.unwrap(),
        None
    );

    let grace = VerifiedIdentity {
        name: Some("Grace Hopper — グレース 🚀".into()),
        ..verified(GOOGLE, "c-1", "Grace@Example.org")
    };
    let first = sign_in(store, &grace).await;
    assert!(first.created && !first.linked, "{first:?}");
    let user = first.user;
    assert_eq!(user.email.as_deref(), Some("Grace@Example.org"));
    assert!(user.email_verified);
    assert_eq!(user.name.as_deref(), Some("Grace Hopper — グレース 🚀"));
    assert_eq!(user.roles, [Role::USER], "a new user has role user");
    assert_eq!(user.providers, [GOOGLE]);
    assert_eq!(store.get(user.id).await.unwrap().as_ref(), Some(&user));
    assert_eq!(
        store
            .find_by_identity(GOOGLE, "c-1")
            .await
            .unwrap()
            .as_ref(),
        Some(&user)
    );
    assert_eq!(store.find_by_identity(APPLE, "c-1").await.unwrap(), None);
    assert_eq!(
        store.find_by_identity(GOOGLE, "C-1").await.unwrap(),
        None,
        "subjects are case-sensitive"
    );

    // The same identity later, with another (unverified) address: the same user.
    let again = sign_in(
        store,
        &identity(GOOGLE, "c-1", Some("grace@elsewhere.example"), false),
    )
    .await;
    assert!(!again.created && !again.linked, "{again:?}");
    assert_eq!(again.user, user, "the user's own fields are not rewritten");

    // The same subject at another provider is another identity, another user.
    let other = sign_in(store, &anonymous(APPLE, "c-1")).await;
    assert!(other.created);
    assert_ne!(other.user.id, user.id);

    // No address, an empty address, an unverified one: a new user each.
    for (subject, email, email_verified) in [
        ("c-2", None, true),
        ("c-3", Some(""), true),
        ("c-4", Some("nobody-else@example.org"), false),
    ] {
        let new = sign_in(store, &identity(GOOGLE, subject, email, email_verified)).await;
        assert!(new.created, "{subject}");
        let expected = email.filter(|e| !e.is_empty());
        assert_eq!(new.user.email.as_deref(), expected, "{subject}");
        assert!(!new.user.email_verified, "{subject}: nothing verified");
        assert_eq!(new.user.name, None);
    }
}

async fn links_by_verified_address(store: &dyn UserStore) {
    let ada = sign_in(store, &verified(GOOGLE, "l-g", "ada@link.example"))
        .await
        .user;

    // Apple, same verified address in another case: linked.
    let apple = sign_in(store, &verified(APPLE, "l-a", "ADA@Link.Example")).await;
    assert!(apple.linked && !apple.created, "{apple:?}");
    assert_eq!(apple.user.id, ada.id);
    assert_eq!(apple.user.providers, [GOOGLE, APPLE], "in link order");
    assert_eq!(
        apple.user.email.as_deref(),
        Some("ada@link.example"),
        "the user keeps its address"
    );
    let again = sign_in(store, &verified(APPLE, "l-a", "ada@link.example")).await;
    assert!(!again.created && !again.linked);
    assert_eq!(again.user.id, ada.id);

    // Facebook: not trusted by default, trusted when the policy says so.
    let facebook = verified(FACEBOOK, "l-f", "ada@link.example");
    refused(store, &facebook, &LinkingPolicy::default()).await;
    let trusting = LinkingPolicy::default().with(FACEBOOK, true);
    let linked = store.sign_in(&facebook, &trusting).await.unwrap();
    assert!(linked.linked);
    assert_eq!(linked.user.id, ada.id);
    assert_eq!(linked.user.providers, [GOOGLE, APPLE, FACEBOOK]);

    // A user may hold the address through a linked identity only.
    let bo = sign_in(store, &anonymous(FACEBOOK, "l-bo")).await.user;
    assert_eq!(bo.email, None);
    store
        .link(bo.id, &verified(APPLE, "l-bo-a", "Bo@Link.Example"))
        .await
        .unwrap();
    let google = sign_in(store, &verified(GOOGLE, "l-bo-g", "bo@link.example")).await;
    assert!(google.linked, "{google:?}");
    assert_eq!(google.user.id, bo.id);
    assert_eq!(google.user.providers, [FACEBOOK, APPLE, GOOGLE]);
}

async fn refuses_to_link_what_it_cannot_trust(store: &dyn UserStore) {
    let rex = sign_in(store, &verified(GOOGLE, "r-g", "rex@refuse.example"))
        .await
        .user;
    let default = LinkingPolicy::default();
    // The new identity's address is not verified.
    refused(
        store,
        &identity(APPLE, "r-a1", Some("rex@refuse.example"), false),
        &default,
    )
    .await;
    // The provider is not trusted.
    refused(
        store,
        &verified(APPLE, "r-a2", "rex@refuse.example"),
        &LinkingPolicy::none(),
    )
    .await;
    // The user has an identity of this provider already.
    refused(
        store,
        &verified(GOOGLE, "r-g2", "rex@refuse.example"),
        &default,
    )
    .await;
    assert_eq!(
        store.get(rex.id).await.unwrap().unwrap().providers,
        [GOOGLE]
    );

    // The existing user's address is not verified: never linked to, and it blocks no
    // one whose address is vouched for. Someone registered Una's address unverified;
    // Una, verified by Apple, gets a user of her own instead of account_exists.
    let squatter = sign_in(
        store,
        &identity(GOOGLE, "u-g", Some("una@unverified.example"), false),
    )
    .await
    .user;
    let una = sign_in(store, &verified(APPLE, "u-a", "UNA@unverified.example")).await;
    assert!(una.created && !una.linked, "{una:?}");
    assert_ne!(una.user.id, squatter.id);
    let una = una.user;
    // A newcomer whose address is not vouched for is still refused while anyone has it.
    refused(
        store,
        &identity(FACEBOOK, "u-f0", Some("una@unverified.example"), false),
        &LinkingPolicy::default().with(FACEBOOK, true),
    )
    .await;
    refused(
        store,
        &verified(FACEBOOK, "u-f1", "una@unverified.example"),
        &default,
    )
    .await;
    // A vouched-for newcomer links to the one user holding it verified, the squatter
    // notwithstanding.
    let trusting = LinkingPolicy::default().with(FACEBOOK, true);
    let linked = store
        .sign_in(
            &verified(FACEBOOK, "u-f2", "una@unverified.example"),
            &trusting,
        )
        .await
        .unwrap();
    assert!(linked.linked, "{linked:?}");
    assert_eq!(linked.user.id, una.id);
    // Once the other user's Google says the address is verified, two users hold it
    // verified: never a guess.
    sign_in(store, &verified(GOOGLE, "u-g", "una@unverified.example")).await;
    let google = verified(GOOGLE, "u-g2", "una@unverified.example");
    refused(store, &google, &default).await;
    // A later sign-in without the address takes that verification away again, and the
    // address is Una's alone once more.
    sign_in(store, &anonymous(GOOGLE, "u-g")).await;
    let linked = sign_in(store, &google).await;
    assert!(linked.linked, "{linked:?}");
    assert_eq!(linked.user.id, una.id);

    // Several users have the address: never a guess.
    let sam = sign_in(store, &anonymous(GOOGLE, "s-1")).await.user;
    store
        .link(sam.id, &verified(APPLE, "s-1a", "sam@several.example"))
        .await
        .unwrap();
    let other = sign_in(store, &anonymous(GOOGLE, "s-2")).await.user;
    store
        .link(other.id, &verified(FACEBOOK, "s-2f", "SAM@several.example"))
        .await
        .unwrap();
    refused(
        store,
        &verified(GOOGLE, "s-3", "sam@several.example"),
        &default,
    )
    .await;
}

async fn links_and_unlinks_explicitly(store: &dyn UserStore) {
    let user = sign_in(store, &anonymous(GOOGLE, "e-g")).await.user;
    let apple = identity(APPLE, "e-a", Some("e@explicit.example"), false);

    let linked = store.link(user.id, &apple).await.unwrap();
    assert_eq!(linked.id, user.id);
    assert_eq!(linked.providers, [GOOGLE, APPLE]);
    let again = store.link(user.id, &apple).await.unwrap();
    assert_eq!(
        again, linked,
        "linking the same identity again changes nothing"
    );
    assert_eq!(
        store
            .find_by_identity(APPLE, "e-a")
            .await
            .unwrap()
            .unwrap()
            .id,
        user.id
    );

    match store.link(user.id, &anonymous(APPLE, "e-a2")).await {
        Err(e @ UserError::ProviderAlreadyLinked { provider: APPLE }) => {
            assert_eq!(e.code(), "provider_already_linked");
        }
        other => panic!("a second APPLE identity: {other:?}"),
    }
    let stranger = sign_in(store, &anonymous(GOOGLE, "e-g2")).await.user;
    match store.link(stranger.id, &apple).await {
        Err(e @ UserError::IdentityTaken) => assert_eq!(e.code(), "identity_taken"),
        other => panic!("another user's identity: {other:?}"),
    }
    match store.link(UserId::new(), &anonymous(FACEBOOK, "e-f")).await {
        Err(e @ UserError::NotFound) => assert_eq!(e.code(), "user_not_found"),
        other => panic!("linking to nobody: {other:?}"),
    }
    assert_eq!(store.find_by_identity(FACEBOOK, "e-f").await.unwrap(), None);

    match store.unlink(user.id, FACEBOOK).await {
        Err(e @ UserError::NotLinked { provider: FACEBOOK }) => assert_eq!(e.code(), "not_linked"),
        other => panic!("unlinking what is not linked: {other:?}"),
    }
    let unlinked = store.unlink(user.id, GOOGLE).await.unwrap();
    assert_eq!(unlinked.providers, [APPLE]);
    assert_eq!(store.find_by_identity(GOOGLE, "e-g").await.unwrap(), None);
    match store.unlink(user.id, APPLE).await {
        Err(e @ UserError::LastIdentity) => assert_eq!(e.code(), "last_identity"),
        other => panic!("unlinking the last identity: {other:?}"),
    }
    assert_eq!(
        store.get(user.id).await.unwrap().unwrap().providers,
        [APPLE]
    );
    assert!(matches!(
        store.unlink(UserId::new(), GOOGLE).await,
        Err(UserError::NotFound)
    ));

    // The unlinked identity is free: it signs in as a new user, and is then taken.
    let reborn = sign_in(store, &anonymous(GOOGLE, "e-g")).await;
    assert!(reborn.created);
    assert_ne!(reborn.user.id, user.id);
    assert!(matches!(
        store.link(user.id, &anonymous(GOOGLE, "e-g")).await,
        Err(UserError::IdentityTaken)
    ));
    // Another provider links, listed last.
    let relinked = store
        .link(user.id, &anonymous(FACEBOOK, "e-f2"))
        .await
        .unwrap();
    assert_eq!(relinked.providers, [APPLE, FACEBOOK]);
    assert_eq!(sign_in(store, &apple).await.user.id, user.id);
}

async fn sets_roles(store: &dyn UserStore) {
    let user = sign_in(store, &anonymous(GOOGLE, "roles-1")).await.user;
    let lead: Role = "team-lead".parse().unwrap();
    let set = store
        .set_roles(
            user.id,
            &[Role::ADMIN, lead.clone(), Role::ADMIN, Role::COACH],
        )
        .await
        .unwrap();
    assert_eq!(set.roles, [Role::ADMIN, lead.clone(), Role::COACH]);
    assert_eq!(store.get(user.id).await.unwrap().unwrap().roles, set.roles);
    let again = sign_in(store, &anonymous(GOOGLE, "roles-1")).await;
    assert_eq!(
        again.user.roles, set.roles,
        "a sign-in keeps the granted roles"
    );
    assert!(
        store
            .set_roles(user.id, &[])
            .await
            .unwrap()
            .roles
            .is_empty()
    );
    assert!(matches!(
        store.set_roles(UserId::new(), &[Role::ADMIN]).await,
        Err(UserError::NotFound)
    ));
}

async fn refuses_invalid_identities(store: &dyn UserStore) {
    let user = sign_in(store, &anonymous(GOOGLE, "bad-0")).await.user;
    let bad = [
        anonymous(GOOGLE, ""),
        anonymous(GOOGLE, &"s".repeat(256)),
        VerifiedIdentity {
            name: Some("nul\0name".into()),
            ..anonymous(GOOGLE, "bad-1")
        },
        identity(APPLE, "bad-2", Some("nul\0@example.org"), true),
        identity(
            APPLE,
            "bad-3",
            Some(&format!("{}@example.org", "a".repeat(320))),
            true,
        ),
    ];
    for identity in &bad {
        let policy = LinkingPolicy::default();
        for result in [
            store.sign_in(identity, &policy).await.map(|s| s.user),
            store.link(user.id, identity).await,
        ] {
            match result {
                Err(e @ UserError::InvalidIdentity { .. }) => {
                    assert_eq!(e.code(), "invalid_identity");
                    assert!(!e.is_retryable());
                }
                other => panic!("{identity:?} should be invalid, got {other:?}"),
            }
        }
    }
    assert_eq!(
        store.get(user.id).await.unwrap().unwrap().providers,
        [GOOGLE]
    );
}

async fn concurrent_first_sign_ins_make_one_user(store: &dyn UserStore) {
    let policy = LinkingPolicy::default();
    for new in [
        verified(GOOGLE, "k-1", "kim@concurrent.example"),
        anonymous(GOOGLE, "k-2"),
    ] {
        let results = join_all((0..8).map(|_| store.sign_in(&new, &policy)).collect()).await;
        let results: Vec<SignIn> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("concurrent sign-in of {new:?}: {e:?}")))
            .collect();
        assert_eq!(
            results.iter().filter(|r| r.created).count(),
            1,
            "exactly one of 8 concurrent first sign-ins creates the user: {results:?}"
        );
        assert!(results.iter().all(|r| !r.linked));
        assert!(results.iter().all(|r| r.user.id == results[0].user.id));
        assert_eq!(results[0].user.providers, [GOOGLE]);
    }

    // Two providers, one new verified address, at once: one user, the other linked.
    let google = verified(GOOGLE, "k-3g", "lee@concurrent.example");
    let apple = verified(APPLE, "k-3a", "Lee@Concurrent.example");
    let both = join_all(vec![
        store.sign_in(&google, &policy),
        store.sign_in(&apple, &policy),
    ])
    .await;
    let both: Vec<SignIn> = both.into_iter().map(Result::unwrap).collect();
    assert_eq!(both[0].user.id, both[1].user.id, "{both:?}");
    assert_eq!(both.iter().filter(|r| r.created).count(), 1, "{both:?}");
    assert_eq!(both.iter().filter(|r| r.linked).count(), 1, "{both:?}");
    let user: User = store.get(both[0].user.id).await.unwrap().unwrap();
    assert_eq!(user.providers.len(), 2);
}

async fn concurrent_unlinks_keep_one_identity(store: &dyn UserStore) {
    let user = sign_in(store, &anonymous(GOOGLE, "cu-g")).await.user;
    store
        .link(user.id, &anonymous(APPLE, "cu-a"))
        .await
        .unwrap();
    let results = join_all(vec![
        store.unlink(user.id, GOOGLE),
        store.unlink(user.id, APPLE),
    ])
    .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let last = results
        .iter()
        .filter(|r| matches!(r, Err(UserError::LastIdentity)))
        .count();
    assert_eq!((ok, last), (1, 1), "{results:?}");
    assert_eq!(
        store.get(user.id).await.unwrap().unwrap().providers.len(),
        1,
        "one way to sign in is left"
    );
}

/// Polls every future on this task until all are done; their outputs in order. (The
/// suites take `&dyn` stores, so they cannot spawn; the calls still overlap at every
/// `.await`, which is where a backend's races are.)
pub(crate) async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

async fn provisions_users_without_identities(store: &dyn UserStore) {
    let id = UserId::new();
    let made = store
        .provision(id, &[Role::ADMIN, Role::ADMIN])
        .await
        .unwrap();
    assert_eq!(made.id, id);
    assert_eq!(made.roles, vec![Role::ADMIN], "roles deduplicated");
    assert!(made.providers.is_empty() && made.email.is_none());
    let again = store.provision(id, &[Role::USER]).await.unwrap();
    assert_eq!(
        again.roles,
        vec![Role::ADMIN],
        "an existing user is left unchanged"
    );
    assert_eq!(store.get(id).await.unwrap(), Some(made));
}

/// A provider's data deletion erases one identity whatever else the user has; the user
/// goes with its last one.
async fn erases_identities_and_their_last_user(store: &dyn UserStore) {
    assert_eq!(
        store.erase_identity(FACEBOOK, "e-none").await.unwrap(),
        None
    );
    let eve = sign_in(store, &verified(GOOGLE, "e-g", "eve@erase.example"))
        .await
        .user;
    store
        .link(eve.id, &anonymous(FACEBOOK, "e-f"))
        .await
        .unwrap();
    // Not the last: the identity goes, the user stays with Google.
    assert_eq!(
        store.erase_identity(FACEBOOK, "e-f").await.unwrap(),
        Some(Erased {
            user_id: eve.id,
            user_deleted: false
        })
    );
    assert_eq!(store.find_by_identity(FACEBOOK, "e-f").await.unwrap(), None);
    assert_eq!(
        store.get(eve.id).await.unwrap().unwrap().providers,
        [GOOGLE]
    );
    assert_eq!(
        store.erase_identity(FACEBOOK, "e-f").await.unwrap(),
        None,
        "once"
    );
    // The last: the user goes too, and a new sign-in of that identity makes a new user.
    assert_eq!(
        store.erase_identity(GOOGLE, "e-g").await.unwrap(),
        Some(Erased {
            user_id: eve.id,
            user_deleted: true
        })
    );
    assert_eq!(store.get(eve.id).await.unwrap(), None);
    let again = sign_in(store, &verified(GOOGLE, "e-g", "eve@erase.example")).await;
    assert!(again.created && again.user.id != eve.id);
    // Another provider's identity with the same subject is another identity.
    assert_eq!(store.erase_identity(APPLE, "e-g").await.unwrap(), None);
    assert!(
        store
            .find_by_identity(GOOGLE, "e-g")
            .await
            .unwrap()
            .is_some()
    );
}

/// Apple's private relay can be turned off and on; a new identity's address is
/// deliverable.
async fn tracks_whether_addresses_are_deliverable(store: &dyn UserStore) {
    let ria = sign_in(store, &verified(APPLE, "d-a", "ria@privaterelay.example"))
        .await
        .user;
    assert_eq!(
        store.email_deliverable(APPLE, "d-a").await.unwrap(),
        Some(true)
    );
    assert_eq!(
        store
            .set_email_deliverable(APPLE, "d-a", false)
            .await
            .unwrap(),
        Some(ria.id)
    );
    assert_eq!(
        store.email_deliverable(APPLE, "d-a").await.unwrap(),
        Some(false)
    );
    // A sign-in does not undo it: only the provider's notice does.
    sign_in(store, &verified(APPLE, "d-a", "ria@privaterelay.example")).await;
    assert_eq!(
        store.email_deliverable(APPLE, "d-a").await.unwrap(),
        Some(false)
    );
    store
        .set_email_deliverable(APPLE, "d-a", true)
        .await
        .unwrap();
    assert_eq!(
        store.email_deliverable(APPLE, "d-a").await.unwrap(),
        Some(true)
    );
    assert_eq!(
        store
            .set_email_deliverable(APPLE, "d-none", false)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.email_deliverable(APPLE, "d-none").await.unwrap(),
        None
    );
    assert_eq!(store.email_deliverable(GOOGLE, "d-a").await.unwrap(), None);
}

/// An identity a user unlinked never links back to that user by its address alone (a
/// sign-in of it is `account_exists`), while other identities still link. An explicit
/// link brings it back; erasing the identity forgets the unlink; one user's unlink does
/// not hold back a link to another user.
async fn an_unlink_sticks_until_the_user_links_again(store: &dyn UserStore) {
    let address = "kai@sticks.example";
    let kai = sign_in(store, &verified(GOOGLE, "k-g", address)).await.user;
    let apple = verified(APPLE, "k-a", address);
    let linked = sign_in(store, &apple).await;
    assert!(linked.linked && linked.user.id == kai.id, "{linked:?}");

    store.unlink(kai.id, APPLE).await.unwrap();
    refused(store, &apple, &LinkingPolicy::default()).await;
    refused(store, &apple, &LinkingPolicy::default()).await;
    // Another Apple identity with the address links as before: only the unlinked one
    // is held back.
    let other = sign_in(store, &verified(APPLE, "k-a2", address)).await;
    assert!(other.linked && other.user.id == kai.id, "{other:?}");
    store.unlink(kai.id, APPLE).await.unwrap();

    // Linked explicitly, it is Kai's again, and signs in as Kai.
    store.link(kai.id, &apple).await.unwrap();
    let back = sign_in(store, &apple).await;
    assert!(
        !back.created && !back.linked && back.user.id == kai.id,
        "{back:?}"
    );
    // ...and after that link, an unlink sticks again.
    store.unlink(kai.id, APPLE).await.unwrap();
    refused(store, &apple, &LinkingPolicy::default()).await;

    // Erased at the person's request: the memory of the unlink goes too, and the
    // identity links by its address as a new one would.
    store.erase_identity(APPLE, "k-a").await.unwrap();
    let relinked = sign_in(store, &apple).await;
    assert!(
        relinked.linked && relinked.user.id == kai.id,
        "{relinked:?}"
    );

    // The unlink of one user does not hold back a link to another: Lee unlinks an
    // identity that later signs in when only Mo holds the address verified.
    let lee = sign_in(store, &verified(GOOGLE, "k-lee", "lee@sticks.example"))
        .await
        .user;
    let fb = identity(FACEBOOK, "k-fb", None, false);
    store.link(lee.id, &fb).await.unwrap();
    store.unlink(lee.id, FACEBOOK).await.unwrap();
    let mo = sign_in(store, &verified(GOOGLE, "k-mo", "mo@sticks.example"))
        .await
        .user;
    let fb_mo = identity(FACEBOOK, "k-fb", Some("mo@sticks.example"), true);
    let trusting = LinkingPolicy::default().with(FACEBOOK, true);
    let moved = store.sign_in(&fb_mo, &trusting).await.unwrap();
    assert!(moved.linked && moved.user.id == mo.id, "{moved:?}");
}

/// A provider the policy does not trust may say an address is verified; that makes its
/// user no verified holder. Someone who registers the victim's address through it (a
/// provider whose users choose their addresses) neither receives the victim's later
/// sign-in with a trusted provider (it gets a user of its own) nor blocks it.
async fn an_untrusted_providers_verified_address_captures_no_one(store: &dyn UserStore) {
    let corp: ProviderId = "corp".parse().unwrap();
    let policy = LinkingPolicy::default().with(corp, false);
    let address = "victim@capture.example";
    let attacker = store
        .sign_in(&verified(corp, "c-attacker", address), &policy)
        .await
        .unwrap();
    assert!(attacker.created);
    let victim = store
        .sign_in(&verified(GOOGLE, "c-victim", address), &policy)
        .await
        .unwrap();
    assert!(victim.created && !victim.linked, "{victim:?}");
    assert_ne!(victim.user.id, attacker.user.id);
    assert_eq!(victim.user.providers, [GOOGLE]);
    // Trusted, the same provider's word would count: Apple links to the one verified
    // holder, the victim, never to the attacker.
    let apple = store
        .sign_in(&verified(APPLE, "c-victim-apple", address), &policy)
        .await
        .unwrap();
    assert!(apple.linked && apple.user.id == victim.user.id, "{apple:?}");
}
