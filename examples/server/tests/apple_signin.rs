//! Sign in with Apple end to end over HTTP on the reference server, against the Apple
//! stand-in (`upcoach_testing::apple`, which checks our ES256 client secret): a browser
//! signs in through Apple's `form_post` callback with its name, the same person signs
//! in from the app with an id token, and Apple's consent-revoked notification ends the
//! sessions. Beside Google (npm `oauth2-mock-server`): a Google user links Apple, signs
//! in with it and unlinks it, an Apple user links Google, and one user's token never
//! links or unlinks another's identities.

mod support;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::signin::{Browser, GOOGLE_CLIENT, google_env, param, urlencode};
use support::{Answer, RETURN_TO, Running, Services, send};
use upcoach_core::event::Event;
use upcoach_server::ServerConfig;
use upcoach_testing::OidcProvider;
use upcoach_testing::apple::{
    AppleStandIn, AppleUser, TEST_KEY_ID, TEST_TEAM_ID, TEST_TEAM_PUBLIC_KEY,
};

const WEB: &str = "com.example.web";
const APP: &str = "com.example.app";
/// The `user` field Apple posts on a first authorization.
const POSTED_USER: &str =
    r#"{"name":{"firstName":"Ada","lastName":"Lovelace"},"email":"ada@privaterelay.appleid.com"}"#;

/// The server with Apple pointed at `apple`, and Google at `google` if given; `edit`
/// changes the configuration.
async fn start(
    apple: &AppleStandIn,
    google: Option<&OidcProvider>,
    edit: impl FnOnce(&mut ServerConfig),
) -> Running {
    let mut env = apple.env(WEB, APP);
    env.extend(google.map(google_env).unwrap_or_default());
    Running::from_env(&env, edit).await
}

async fn apple_stand_in() -> AppleStandIn {
    AppleStandIn::start(TEST_TEAM_ID, TEST_KEY_ID, TEST_TEAM_PUBLIC_KEY).await
}

/// Google's stand-in, Apple's, and the server with both (`edit` changing its
/// configuration), or `None` (skip) without Node.
async fn start_with_google(
    edit: impl FnOnce(&mut ServerConfig),
) -> Option<(OidcProvider, AppleStandIn, Running)> {
    let google = OidcProvider::start().await?;
    let apple = apple_stand_in().await;
    let server = start(&apple, Some(&google), edit).await;
    Some((google, apple, server))
}

fn ada() -> AppleUser {
    AppleUser::new("001234.5f8e1c2d3b4a.0042", "ada@privaterelay.appleid.com")
}

/// What a native app gives Apple for its raw nonce.
fn hashed(raw: &str) -> String {
    Sha256::digest(raw.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The query of a web sign-in that returns to the web app.
fn web_query() -> String {
    format!("platform=web&return_to={}", urlencode(RETURN_TO))
}

/// Apple's `form_post` back to our callback, from a browser that sends `cookie`.
async fn post_callback(server: &Running, form: &str, cookie: Option<&str>) -> Answer {
    let mut headers = vec![
        ("origin", "https://appleid.apple.com"),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    headers.extend(cookie.map(|cookie| ("cookie", cookie)));
    send(
        Method::POST,
        &server.url("/auth/apple/callback"),
        &headers,
        Some(form.to_owned()),
    )
    .await
}

/// Apple's answer to the authorization request `apple_url`: a code for `user` issued
/// to the web client with the request's redirect URI and nonce, posted with its `state`
/// and, on a first authorization, the `user` field Apple posts once.
fn apple_form(
    apple: &AppleStandIn,
    apple_url: &url::Url,
    user: &AppleUser,
    posted_user: Option<&str>,
) -> String {
    let code = apple.issue_code(
        user,
        WEB,
        Some(&param(apple_url, "redirect_uri")),
        Some(&param(apple_url, "nonce")),
    );
    let mut form = format!(
        "code={}&state={}",
        urlencode(&code),
        urlencode(&param(apple_url, "state"))
    );
    if let Some(posted_user) = posted_user {
        form.push_str(&format!("&user={}", urlencode(posted_user)));
    }
    form
}

/// A web sign-in with Apple as `user` in a new browser: authorize, Apple's cross-site
/// `form_post` to our callback (with only the cookies a browser sends on one, the
/// `SameSite=None` ones), our redirect to the web app with a login code, the exchange.
/// The exchange's answer, or the callback's when it refused.
async fn apple_sign_in_web(server: &Running, apple: &AppleStandIn, user: &AppleUser) -> Answer {
    let mut browser = Browser::default();
    let apple_url = browser
        .authorize(server, "apple", &web_query())
        .await
        .location();
    let form = apple_form(apple, &apple_url, user, None);
    let landed = post_callback(server, &form, browser.cross_site_cookie().as_deref()).await;
    if landed.status != StatusCode::FOUND {
        return landed;
    }
    browser.finish(server, &landed).await
}

/// The body of `/auth/apple/token` or `/auth/link/apple` from the app: Apple's id token
/// for `user` issued to the bundle id with the hash of `nonce`, and `nonce`.
fn apple_native(apple: &AppleStandIn, user: &AppleUser, nonce: &str) -> Value {
    json!({
        "id_token": apple.id_token(user, APP, Some(&hashed(nonce))),
        "nonce": nonce,
        "platform": "ios",
    })
}

/// The body of `/auth/google/token` or `/auth/link/google` from the app: the id token
/// `google` issues for `claims` with `nonce`, and `nonce`.
async fn google_native(google: &OidcProvider, claims: &Value, nonce: &str) -> Value {
    let id_token = google.id_token(GOOGLE_CLIENT, nonce, claims).await;
    json!({"id_token": id_token, "nonce": nonce, "platform": "ios"})
}

/// The user the bearer `access` is signed in as (`GET /auth/me`, which must answer 200).
async fn me(server: &Running, access: &str) -> Value {
    let me = server.get_as("/auth/me", Some(access)).await;
    assert_eq!(me.status, StatusCode::OK, "{:?}", me.body);
    me.json
}

/// A signed-in user's id and access token, from a TokenResponse that must be 200.
fn signed_in(answer: &Answer) -> (Value, String) {
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let access = answer.json["access_token"]
        .as_str()
        .expect("an access token");
    (answer.json["user"]["id"].clone(), access.to_owned())
}

/// Whether a security event `name` about `provider` was recorded.
async fn recorded(server: &Running, name: &str, provider: &str) -> bool {
    server.security_events().await.iter().any(|e| match e {
        Event::Security(e) => e.event_type == name && e.details["provider"] == provider,
        _ => false,
    })
}

#[tokio::test]
async fn a_browser_and_an_app_sign_ada_in_with_apple_until_she_revokes_consent() {
    let apple = apple_stand_in().await;
    let server = start(&apple, None, |_| {}).await;

    // Authorize: to Apple with form_post; the flow cookie must survive Apple's
    // cross-site POST back.
    let mut browser = Browser::default();
    let started = browser.authorize(&server, "apple", &web_query()).await;
    let apple_url = started.location();
    assert!(
        apple_url.as_str().starts_with(&apple.authorize_url()),
        "{apple_url}"
    );
    assert_eq!(param(&apple_url, "client_id"), WEB);
    assert_eq!(param(&apple_url, "response_mode"), "form_post");
    assert_eq!(
        param(&apple_url, "redirect_uri"),
        server.url("/auth/apple/callback")
    );
    let flow_cookie = started
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|c| c.to_str().unwrap())
        .find(|c| c.starts_with("upcoach_flow="))
        .expect("a flow cookie");
    assert!(flow_cookie.contains("SameSite=None"), "{flow_cookie}");
    assert!(flow_cookie.contains("Secure"), "{flow_cookie}");
    assert!(flow_cookie.contains("HttpOnly"), "{flow_cookie}");

    // Apple's POST from a browser that did not begin this sign-in (another flow, so
    // this one stays untouched).
    let other = Browser::default()
        .authorize(&server, "apple", &web_query())
        .await
        .location();
    let stray = post_callback(
        &server,
        &apple_form(&apple, &other, &ada(), Some(POSTED_USER)),
        None,
    )
    .await;
    assert!(
        matches!(stray.status.as_u16(), 400 | 401 | 403),
        "{:?} {:?}",
        stray.status,
        stray.json
    );
    assert_eq!(
        stray.json["error"]["code"], "flow_browser_mismatch",
        "{:?}",
        stray.json
    );

    // The browser that began: back to the web app with a login code.
    let form = apple_form(&apple, &apple_url, &ada(), Some(POSTED_USER));
    let landed = post_callback(&server, &form, browser.cookie()).await;
    let exchanged = browser.finish(&server, &landed).await;
    assert_eq!(exchanged.status, StatusCode::OK, "{:?}", exchanged.json);
    let web_user = exchanged.json["user"]["id"].clone();
    assert!(web_user.is_string());
    let me = server
        .get_as("/auth/me", exchanged.json["access_token"].as_str())
        .await;
    assert_eq!(me.status, StatusCode::OK, "{:?}", me.json);
    assert_eq!(me.json["name"], "Ada Lovelace", "{:?}", me.json);
    assert_eq!(me.json["email"], "ada@privaterelay.appleid.com");
    assert_eq!(apple.client_secret_failures(), 0);

    // The app: Apple's id token for the bundle id, carrying the hash of its nonce.
    let native = server
        .sign_in_native("apple", apple_native(&apple, &ada(), "app-nonce-1"))
        .await;
    assert_eq!(native.status, StatusCode::OK, "{:?}", native.json);
    assert_eq!(native.json["user"]["id"], web_user, "one person, one user");
    assert_eq!(
        native.json["user"]["name"], "Ada Lovelace",
        "the name Apple posted once stays"
    );
    let access = native.json["access_token"].as_str().unwrap();

    // Apple is Ada's only way in: it cannot be unlinked.
    let last = server.unlink("apple", access).await;
    assert_eq!(last.status, StatusCode::CONFLICT, "{:?}", last.json);
    assert_eq!(last.code(), "last_identity");

    // The session works until Apple says consent was revoked.
    let refreshed = server.refresh(&native.json["refresh_token"], &[]).await;
    assert_eq!(refreshed.status, StatusCode::OK, "{:?}", refreshed.json);
    let revoked = json!({"payload": apple.notification(APP, json!({
        "type": "consent-revoked",
        "sub": ada().sub,
        "event_time": 1_700_000_000_123_u64,
    }))});
    let notify = async || {
        server
            .send(
                Method::POST,
                "/auth/apple/notifications",
                Some(revoked.clone()),
                None,
            )
            .await
    };
    let handled = notify().await;
    assert_eq!(handled.status, StatusCode::OK, "{:?}", handled.json);
    let replayed = notify().await;
    assert_eq!(replayed.status, StatusCode::CONFLICT, "{:?}", replayed.json);
    assert_eq!(replayed.code(), "notification_replayed");
    for ended in [
        server.refresh(&refreshed.json["refresh_token"], &[]).await,
        browser
            .refresh(&server, &exchanged.json["refresh_token"])
            .await,
    ] {
        assert_eq!(ended.status, StatusCode::UNAUTHORIZED, "{:?}", ended.json);
        assert_eq!(ended.code(), "refresh_token_revoked");
    }
}

/// Ada's Google account, whose address Google verified.
fn ada_google() -> Value {
    json!({"sub": "google-ada", "email": "ada@example.test", "email_verified": true})
}

/// Ada signed in with Google on the web and linked `apple_id` from the app: her user id
/// and Google access token.
async fn google_user_with_apple(
    server: &Running,
    apple: &AppleStandIn,
    apple_id: &AppleUser,
) -> (Value, String) {
    let (user, access) = signed_in(
        &Browser::default()
            .sign_in_web(server, "google", &ada_google())
            .await,
    );
    assert_eq!(me(server, &access).await["providers"], json!(["google"]));
    let linked = server
        .link(
            "apple",
            apple_native(apple, apple_id, "ada-link-1"),
            &access,
        )
        .await;
    assert_eq!(linked.status, StatusCode::OK, "{:?}", linked.body);
    assert_eq!(linked.json["id"], user);
    assert_eq!(linked.json["providers"], json!(["google", "apple"]));
    (user, access)
}

/// A Google user links Apple (from the app), signs in with Apple in the browser
/// (form_post) and in the app as the same user, unlinks it, links it again; unlinked a
/// second time, Apple's sign-in does not reach her account: her Apple ID hides her
/// address behind a private relay one that no account has any more, so it makes a new
/// account (rule 2 of `upcoach_auth::users`), and that account's Apple identity cannot
/// be linked to hers (`identity_taken`). Returns the new account's id.
async fn google_user_links_and_unlinks_apple(server: &Running, apple: &AppleStandIn) -> Value {
    let (user, access) = google_user_with_apple(server, apple, &ada()).await;
    let replayed = server
        .link("apple", apple_native(apple, &ada(), "ada-link-1"), &access)
        .await;
    assert_eq!(
        (replayed.status, replayed.code()),
        (StatusCode::UNAUTHORIZED, "nonce_replayed".into())
    );
    assert_eq!(
        me(server, &access).await["providers"],
        json!(["google", "apple"])
    );

    // Linked: Apple's web sign-in (form_post) and the app's find the same user.
    let as_apple = apple_sign_in_web(server, apple, &ada()).await;
    assert_eq!(signed_in(&as_apple).0, user, "linked: the same user");
    assert_eq!(
        as_apple.json["user"]["providers"],
        json!(["google", "apple"])
    );
    let native = server
        .sign_in_native("apple", apple_native(apple, &ada(), "ada-native-1"))
        .await;
    assert_eq!(signed_in(&native).0, user);

    // Unlinked: Google remains; a second unlink has nothing to remove.
    let unlinked = server.unlink("apple", &access).await;
    assert_eq!(unlinked.status, StatusCode::OK, "{:?}", unlinked.body);
    assert_eq!(unlinked.json["providers"], json!(["google"]));
    assert_eq!(me(server, &access).await["providers"], json!(["google"]));
    let again = server.unlink("apple", &access).await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::NOT_FOUND, "not_linked".into())
    );

    // Linked again, and signing in with Apple finds her once more.
    let relinked = server
        .link("apple", apple_native(apple, &ada(), "ada-link-2"), &access)
        .await;
    assert_eq!(relinked.status, StatusCode::OK, "{:?}", relinked.body);
    assert_eq!(relinked.json["id"], user);
    assert_eq!(relinked.json["providers"], json!(["google", "apple"]));
    let as_apple = apple_sign_in_web(server, apple, &ada()).await;
    assert_eq!(signed_in(&as_apple).0, user, "relinked: the same user");

    // Unlinked again: Apple's next sign-in is a new account with only Apple.
    let unlinked = server.unlink("apple", &access).await;
    assert_eq!(unlinked.status, StatusCode::OK, "{:?}", unlinked.body);
    let after = apple_sign_in_web(server, apple, &ada()).await;
    let (newcomer, newcomer_access) = signed_in(&after);
    assert_ne!(newcomer, user, "not the account Apple was unlinked from");
    assert_eq!(after.json["user"]["providers"], json!(["apple"]));
    assert_eq!(after.json["user"]["email"], "ada@privaterelay.appleid.com");
    assert_eq!(me(server, &access).await["providers"], json!(["google"]));

    // That Apple ID is now the new account's: Ada's account cannot take it.
    let taken = server
        .link("apple", apple_native(apple, &ada(), "ada-link-3"), &access)
        .await;
    assert_eq!(
        (taken.status, taken.code()),
        (StatusCode::CONFLICT, "identity_taken".into()),
        "{:?}",
        taken.body
    );
    assert_eq!(me(server, &access).await["providers"], json!(["google"]));
    assert_eq!(
        me(server, &newcomer_access).await["providers"],
        json!(["apple"])
    );

    assert!(recorded(server, "identity_linked", "apple").await);
    assert!(recorded(server, "identity_unlinked", "apple").await);
    assert!(recorded(server, "login_success", "apple").await);
    assert_eq!(apple.client_secret_failures(), 0);
    newcomer
}

#[tokio::test]
async fn a_google_user_links_apple_signs_in_with_it_and_unlinks_it() {
    let Some((_google, apple, server)) = start_with_google(|_| {}).await else {
        return;
    };
    google_user_links_and_unlinks_apple(&server, &apple).await;
}

/// The same with users in Postgres and flows in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_google_user_links_and_unlinks_apple_with_postgres_and_redis() {
    let Some(services) = Services::create().await else {
        return;
    };
    let Some((_google, apple, server)) =
        start_with_google(|config| services.configure(config)).await
    else {
        return;
    };
    assert!(server.app.backends().postgres.is_some() && server.app.backends().redis.is_some());
    let newcomer = google_user_links_and_unlinks_apple(&server, &apple).await;
    let stored: Vec<(String, String)> = sqlx::query_as(
        "SELECT subject, user_id::text FROM user_identities WHERE provider = 'apple'",
    )
    .fetch_all(services.schema.pool())
    .await
    .unwrap();
    assert_eq!(
        stored,
        [(ada().sub, newcomer.as_str().unwrap().to_owned())],
        "one Apple identity, the new account's"
    );
}

/// When Ada's Apple ID shares the address her Google account verified, unlinking it
/// sticks: a later Apple sign-in is not linked back by the address (409
/// `account_exists`, recorded as a `login_failed`), her account keeps Google only,
/// and only linking Apple again, signed in, brings it back.
#[tokio::test]
async fn an_unlinked_apple_id_is_not_linked_back_by_its_address() {
    let Some((_google, apple, server)) = start_with_google(|_| {}).await else {
        return;
    };
    let shared = AppleUser::new("001234.ada-shares.0042", "ada@example.test");
    let (user, access) = google_user_with_apple(&server, &apple, &shared).await;
    let unlinked = server.unlink("apple", &access).await;
    assert_eq!(unlinked.json["providers"], json!(["google"]));

    for _ in 0..2 {
        let after = apple_sign_in_web(&server, &apple, &shared).await;
        assert_eq!(
            (after.status, after.code().as_str()),
            (StatusCode::CONFLICT, "account_exists"),
            "{:?}",
            after.body
        );
    }
    assert_eq!(me(&server, &access).await["providers"], json!(["google"]));
    let events = server.security_events().await;
    let refused = events.iter().any(|e| match e {
        Event::Security(e) => {
            e.event_type == "login_failed"
                && e.details["provider"] == "apple"
                && e.details["code"] == "account_exists"
        }
        _ => false,
    });
    assert!(refused, "{events:?}");

    let relinked = server
        .link(
            "apple",
            apple_native(&apple, &shared, "ada-relink-1"),
            &access,
        )
        .await;
    assert_eq!(relinked.status, StatusCode::OK, "{:?}", relinked.body);
    let back = apple_sign_in_web(&server, &apple, &shared).await;
    assert_eq!(signed_in(&back).0, user, "{:?}", back.body);
}

/// The reverse: Bea signs up with Apple on the web, links Google from the app, and
/// then signs in with either as the same user; she can unlink Apple, the provider she
/// signed up with, but not then Google, her last way in.
#[tokio::test]
async fn an_apple_user_links_google() {
    let Some((google, apple, server)) = start_with_google(|_| {}).await else {
        return;
    };
    let bea_apple = AppleUser::new("001234.bea.0043", "bea@privaterelay.appleid.com");
    let bea_google =
        json!({"sub": "google-bea", "email": "bea@example.test", "email_verified": true});

    let first = apple_sign_in_web(&server, &apple, &bea_apple).await;
    let (user, access) = signed_in(&first);
    assert_eq!(first.json["user"]["providers"], json!(["apple"]));

    let linked = server
        .link(
            "google",
            google_native(&google, &bea_google, "bea-link-1").await,
            &access,
        )
        .await;
    assert_eq!(linked.status, StatusCode::OK, "{:?}", linked.body);
    assert_eq!(linked.json["id"], user);
    assert_eq!(linked.json["providers"], json!(["apple", "google"]));

    let as_google = Browser::default()
        .sign_in_web(&server, "google", &bea_google)
        .await;
    assert_eq!(signed_in(&as_google).0, user, "linked: the same user");
    let as_apple = apple_sign_in_web(&server, &apple, &bea_apple).await;
    assert_eq!(signed_in(&as_apple).0, user);
    let native = server
        .sign_in_native(
            "google",
            google_native(&google, &bea_google, "bea-native-1").await,
        )
        .await;
    assert_eq!(signed_in(&native).0, user);

    let unlinked = server.unlink("apple", &access).await;
    assert_eq!(unlinked.status, StatusCode::OK, "{:?}", unlinked.body);
    assert_eq!(unlinked.json["providers"], json!(["google"]));
    let as_google = Browser::default()
        .sign_in_web(&server, "google", &bea_google)
        .await;
    assert_eq!(signed_in(&as_google).0, user);
    let last = server.unlink("google", &access).await;
    assert_eq!(
        (last.status, last.code()),
        (StatusCode::CONFLICT, "last_identity".into())
    );
    assert_eq!(apple.client_secret_failures(), 0);
}

/// Another signed-in user's token touches only their own account: Bob cannot unlink
/// Ada's Apple or Google, and cannot link Ada's identities (409 `identity_taken`);
/// what he links is his. Without a token nothing is linked or unlinked.
#[tokio::test]
async fn a_second_user_cannot_link_or_unlink_on_the_first_users_account() {
    let Some((google, apple, server)) = start_with_google(|_| {}).await else {
        return;
    };
    let (ada_user, ada_access) = google_user_with_apple(&server, &apple, &ada()).await;
    let bob_google =
        json!({"sub": "google-bob", "email": "bob@example.test", "email_verified": true});
    let (bob_user, bob_access) = signed_in(
        &Browser::default()
            .sign_in_web(&server, "google", &bob_google)
            .await,
    );
    assert_ne!(bob_user, ada_user);
    let ada_is_intact = async || {
        assert_eq!(
            me(&server, &ada_access).await["providers"],
            json!(["google", "apple"])
        );
        let as_apple = apple_sign_in_web(&server, &apple, &ada()).await;
        assert_eq!(signed_in(&as_apple).0, ada_user);
        let as_google = Browser::default()
            .sign_in_web(&server, "google", &ada_google())
            .await;
        assert_eq!(signed_in(&as_google).0, ada_user);
    };

    // Unlinking acts on Bob's own account: he has no Apple, and Google is his last.
    let no_apple = server.unlink("apple", &bob_access).await;
    assert_eq!(
        (no_apple.status, no_apple.code()),
        (StatusCode::NOT_FOUND, "not_linked".into())
    );
    let last = server.unlink("google", &bob_access).await;
    assert_eq!(
        (last.status, last.code()),
        (StatusCode::CONFLICT, "last_identity".into())
    );
    ada_is_intact().await;

    // Ada's identities are hers: Bob's token cannot link them.
    for (provider, body) in [
        ("apple", apple_native(&apple, &ada(), "bob-takes-1")),
        (
            "google",
            google_native(&google, &ada_google(), "bob-takes-2").await,
        ),
    ] {
        let taken = server.link(provider, body, &bob_access).await;
        assert_eq!(
            (taken.status, taken.code()),
            (StatusCode::CONFLICT, "identity_taken".into()),
            "{provider}: {:?}",
            taken.body
        );
    }
    assert_eq!(
        me(&server, &bob_access).await["providers"],
        json!(["google"])
    );
    ada_is_intact().await;

    // What Bob links with his token is his.
    let bob_apple = AppleUser::new("001234.bob.0044", "bob@privaterelay.appleid.com");
    let linked = server
        .link(
            "apple",
            apple_native(&apple, &bob_apple, "bob-link-1"),
            &bob_access,
        )
        .await;
    assert_eq!(linked.status, StatusCode::OK, "{:?}", linked.body);
    assert_eq!(linked.json["id"], bob_user);
    assert_eq!(linked.json["providers"], json!(["google", "apple"]));
    let as_bob = apple_sign_in_web(&server, &apple, &bob_apple).await;
    assert_eq!(signed_in(&as_bob).0, bob_user);
    ada_is_intact().await;

    // No token, no change.
    let anonymous_link = server
        .send(
            Method::POST,
            "/auth/link/apple",
            Some(apple_native(&apple, &bob_apple, "anonymous-1")),
            None,
        )
        .await;
    assert_eq!(anonymous_link.status, StatusCode::UNAUTHORIZED);
    let anonymous_unlink = server
        .send(Method::DELETE, "/auth/link/apple", None, None)
        .await;
    assert_eq!(anonymous_unlink.status, StatusCode::UNAUTHORIZED);
    ada_is_intact().await;
}
