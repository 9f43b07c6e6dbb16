//! A generic OpenID Connect provider beside Google on the reference server, configured
//! by environment variables only (`OIDC_PROVIDERS=corp`, `OIDC_CORP_*`), each provider
//! an independent OpenID provider (npm `oauth2-mock-server`): sign-in, linking and
//! unlinking under the provider's own name, trusted-for-linking, unknown names, and a
//! server that starts while the provider is down.

mod support;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::signin::{Browser, google_env};
use support::{Running, Services};
use upcoach_core::config::Settings;
use upcoach_core::event::Event;
use upcoach_server::ServerConfig;
use upcoach_testing::OidcProvider;

const CORP_CLIENT: &str = "corp-web-client";

/// Google at `google` and `corp` at `corp_issuer` (`OIDC_PROVIDERS=corp`), plus
/// `extra` variables; `edit` changes the configuration read from them.
async fn start(
    google: &OidcProvider,
    corp_issuer: &str,
    extra: &[(&str, &str)],
    edit: impl FnOnce(&mut ServerConfig),
) -> Running {
    let mut env = google_env(google);
    env.extend([
        ("OIDC_PROVIDERS", "corp".to_owned()),
        ("OIDC_CORP_ISSUER", corp_issuer.to_owned()),
        ("OIDC_CORP_CLIENT_ID", CORP_CLIENT.to_owned()),
        ("OIDC_CORP_CLIENT_SECRET", "corp-secret".to_owned()),
    ]);
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    Running::from_env(&env, |config| {
        assert_eq!(config.auth.openid.len(), 1);
        edit(config);
    })
    .await
}

/// Two independent providers (Google's and corp's), or `None` (skip) without Node.
async fn providers() -> Option<(OidcProvider, OidcProvider)> {
    Some((OidcProvider::start().await?, OidcProvider::start().await?))
}

/// A native sign-in with corp: the id token corp's app obtains for `claims` with
/// `nonce`, posted to `/auth/corp/token` from `platform`.
async fn corp_token(
    server: &Running,
    corp: &OidcProvider,
    nonce: &str,
    claims: &Value,
    platform: &str,
) -> support::Answer {
    let id_token = corp.id_token(CORP_CLIENT, nonce, claims).await;
    server
        .sign_in_native(
            "corp",
            json!({"id_token": id_token, "nonce": nonce, "platform": platform}),
        )
        .await
}

fn providers_of(user: &Value) -> Value {
    user["providers"].clone()
}

/// The core path: a Google user links corp, signs in with it, unlinks it; corp then
/// signs in someone else as a new user, and the unlinked corp account (an untrusted
/// provider by default) cannot sign in on its own while its address names the Google
/// user.
async fn google_user_links_and_unlinks_corp(server: &Running, corp: &OidcProvider) {
    let dave_google =
        json!({"sub": "google-dave", "email": "dave@example.test", "email_verified": true});
    let dave_corp =
        json!({"sub": "corp-dave", "email": "dave@example.test", "email_verified": true});

    let mut browser = Browser::default();
    let signed_in = browser.sign_in_web(server, "google", &dave_google).await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    let tokens = signed_in.json;
    let user = tokens["user"]["id"].clone();
    assert_eq!(providers_of(&tokens["user"]), json!(["google"]));
    let access = tokens["access_token"].as_str().unwrap().to_owned();

    // Link corp with an id token its app obtained (the body of /auth/corp/token).
    let id_token = corp.id_token(CORP_CLIENT, "link-corp-1", &dave_corp).await;
    let body = json!({"id_token": id_token, "nonce": "link-corp-1", "platform": "ios"});
    let linked = server.link("corp", body.clone(), &access).await;
    assert_eq!(linked.status, StatusCode::OK, "{:?}", linked.body);
    assert_eq!(linked.json["id"], user);
    assert_eq!(providers_of(&linked.json), json!(["google", "corp"]));
    let replayed = server.link("corp", body, &access).await;
    assert_eq!(
        (replayed.status, replayed.code()),
        (StatusCode::UNAUTHORIZED, "nonce_replayed".into())
    );

    let me = server.get_as("/auth/me", Some(&access)).await;
    assert_eq!(me.status, StatusCode::OK, "{:?}", me.body);
    assert_eq!(providers_of(&me.json), json!(["google", "corp"]));

    // Linked: corp's browser sign-in finds the same user.
    let as_corp = Browser::default()
        .sign_in_web(server, "corp", &dave_corp)
        .await;
    assert_eq!(as_corp.status, StatusCode::OK, "{:?}", as_corp.body);
    assert_eq!(as_corp.json["user"]["id"], user, "linked: the same user");
    // And natively, with the corp app's token.
    let native = corp_token(server, corp, "corp-native-1", &dave_corp, "android").await;
    assert_eq!(native.status, StatusCode::OK, "{:?}", native.body);
    assert_eq!(native.json["user"]["id"], user);

    let unlinked = server.unlink("corp", &access).await;
    assert_eq!(unlinked.status, StatusCode::OK, "{:?}", unlinked.body);
    assert_eq!(providers_of(&unlinked.json), json!(["google"]));
    let me = server.get_as("/auth/me", Some(&access)).await;
    assert_eq!(providers_of(&me.json), json!(["google"]));
    let again = server.unlink("corp", &access).await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::NOT_FOUND, "not_linked".into()),
        "{:?}",
        again.body
    );

    // Unlinked, and corp is not trusted for linking: its verified address names the
    // Google user, so the sign-in is refused rather than linked back or made a second
    // account.
    let refused = Browser::default()
        .sign_in(server, "corp", "platform=web", &dave_corp)
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (StatusCode::CONFLICT, "account_exists".into()),
        "{:?}",
        refused.body
    );

    // Someone else signs in with corp: a new user with only corp.
    let erin = json!({"sub": "corp-erin", "email": "erin@corp.example", "email_verified": true});
    let new_person = Browser::default().sign_in_web(server, "corp", &erin).await;
    assert_eq!(new_person.status, StatusCode::OK, "{:?}", new_person.body);
    let erin_user = new_person.json["user"].clone();
    assert_ne!(erin_user["id"], user, "a different user");
    assert_eq!(providers_of(&erin_user), json!(["corp"]));
    assert_eq!(erin_user["email"], "erin@corp.example");
    let erin_access = new_person.json["access_token"].as_str().unwrap().to_owned();
    let last = server.unlink("corp", &erin_access).await;
    assert_eq!(
        (last.status, last.code()),
        (StatusCode::CONFLICT, "last_identity".into())
    );

    // The security events name the provider.
    let events = server.security_events().await;
    let with = |name: &str| {
        events.iter().any(|e| match e {
            Event::Security(e) => e.event_type == name && e.details["provider"] == "corp",
            _ => false,
        })
    };
    assert!(
        with("identity_linked") && with("identity_unlinked") && with("login_success"),
        "{events:?}"
    );
    assert!(with("login_failed"), "the refused sign-in is recorded");
}

#[tokio::test]
async fn a_google_user_links_and_unlinks_a_second_openid_provider() {
    let Some((google, corp)) = providers().await else {
        return;
    };
    let server = start(&google, corp.issuer(), &[], |_| {}).await;
    google_user_links_and_unlinks_corp(&server, &corp).await;
}

/// The same with users in Postgres and flows in Redis, where the provider's name is
/// stored and read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_openid_provider_works_with_postgres_and_redis() {
    let Some(services) = Services::create().await else {
        return;
    };
    let Some((google, corp)) = providers().await else {
        return;
    };
    let server = start(&google, corp.issuer(), &[], |config| {
        services.configure(config)
    })
    .await;
    assert!(server.app.backends().postgres.is_some() && server.app.backends().redis.is_some());
    google_user_links_and_unlinks_corp(&server, &corp).await;
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT provider FROM user_identities ORDER BY provider")
            .fetch_all(services.schema.pool())
            .await
            .unwrap();
    assert_eq!(stored, ["corp", "google"]);
}

/// `OIDC_CORP_TRUSTED_FOR_LINKING=true`: a corp sign-in with the verified address of a
/// Google user joins that user; an unverified one does not. The default (and `false`)
/// refuses with `account_exists`.
#[tokio::test]
async fn trusted_for_linking_decides_whether_a_verified_address_links() {
    let Some((google, corp)) = providers().await else {
        return;
    };
    let erin_google =
        json!({"sub": "google-erin", "email": "erin@example.test", "email_verified": true});
    let erin_corp =
        json!({"sub": "corp-erin", "email": "Erin@Example.test", "email_verified": true});

    let trusted = start(
        &google,
        corp.issuer(),
        &[("OIDC_CORP_TRUSTED_FOR_LINKING", "true")],
        |_| {},
    )
    .await;
    let first = Browser::default()
        .sign_in_web(&trusted, "google", &erin_google)
        .await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let user = first.json["user"]["id"].clone();
    let linked = Browser::default()
        .sign_in_web(&trusted, "corp", &erin_corp)
        .await;
    assert_eq!(linked.status, StatusCode::OK, "{:?}", linked.body);
    assert_eq!(linked.json["user"]["id"], user, "linked automatically");
    assert_eq!(
        providers_of(&linked.json["user"]),
        json!(["google", "corp"])
    );
    // Natively too (another address, another user).
    let frank_google =
        json!({"sub": "google-frank", "email": "frank@example.test", "email_verified": true});
    let frank = Browser::default()
        .sign_in_web(&trusted, "google", &frank_google)
        .await
        .json["user"]["id"]
        .clone();
    let frank_corp =
        json!({"sub": "corp-frank", "email": "frank@example.test", "email_verified": true});
    let native = corp_token(&trusted, &corp, "trusted-1", &frank_corp, "ios").await;
    assert_eq!(native.status, StatusCode::OK, "{:?}", native.body);
    assert_eq!(native.json["user"]["id"], frank);
    // Trusted or not, an address the provider did not verify never links.
    let gina_google =
        json!({"sub": "google-gina", "email": "gina@example.test", "email_verified": true});
    assert_eq!(
        Browser::default()
            .sign_in_web(&trusted, "google", &gina_google)
            .await
            .status,
        StatusCode::OK
    );
    for verified in [json!(false), json!("true")] {
        let gina_corp =
            json!({"sub": "corp-gina", "email": "gina@example.test", "email_verified": verified});
        let refused = Browser::default()
            .sign_in(&trusted, "corp", "platform=web", &gina_corp)
            .await;
        assert_eq!(
            (refused.status, refused.code()),
            (StatusCode::CONFLICT, "account_exists".into()),
            "email_verified {verified}"
        );
    }

    for extra in [&[][..], &[("OIDC_CORP_TRUSTED_FOR_LINKING", "false")][..]] {
        let untrusted = start(&google, corp.issuer(), extra, |_| {}).await;
        let first = Browser::default()
            .sign_in_web(&untrusted, "google", &erin_google)
            .await;
        assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
        let refused = Browser::default()
            .sign_in(&untrusted, "corp", "platform=web", &erin_corp)
            .await;
        assert_eq!(
            (refused.status, refused.code()),
            (StatusCode::CONFLICT, "account_exists".into()),
            "{extra:?}: {:?}",
            refused.body
        );
        let native = corp_token(&untrusted, &corp, "untrusted-1", &erin_corp, "ios").await;
        assert_eq!(
            (native.status, native.code()),
            (StatusCode::CONFLICT, "account_exists".into()),
            "{extra:?}"
        );
    }
}

#[tokio::test]
async fn names_that_are_not_configured_or_not_names_answer_404() {
    let Some((google, corp)) = providers().await else {
        return;
    };
    let server = start(&google, corp.issuer(), &[], |_| {}).await;
    let access = Browser::default()
        .sign_in_web(&server, "google", &json!({}))
        .await
        .json["access_token"]
        .as_str()
        .unwrap()
        .to_owned();

    for (method, path, code) in [
        (Method::GET, "/auth/gitlab/authorize", "unknown_provider"),
        (
            Method::GET,
            "/auth/gitlab/authorize?platform=web",
            "unknown_provider",
        ),
        (Method::GET, "/auth/Corp/authorize", "unknown_provider"),
        (Method::GET, "/auth/CORP/authorize", "unknown_provider"),
        (Method::GET, "/auth/corp_x/authorize", "unknown_provider"),
        (Method::GET, "/auth/1corp/authorize", "unknown_provider"),
        (
            Method::GET,
            "/auth/abcdefghijklmnopqrstuvwxyz0123456/authorize",
            "unknown_provider",
        ),
        (
            Method::GET,
            "/auth/gitlab/callback?code=c&state=s",
            "unknown_provider",
        ),
        (Method::POST, "/auth/gitlab/token", "unknown_provider"),
        (
            Method::GET,
            "/auth/apple/authorize",
            "provider_not_configured",
        ),
    ] {
        let body = (method == Method::POST)
            .then(|| json!({"id_token": "x.y.z", "nonce": "n", "platform": "ios"}));
        let answer = server.send(method, path, body, None).await;
        assert_eq!(
            (answer.status, answer.code()),
            (StatusCode::NOT_FOUND, code.to_owned()),
            "{path}: {:?}",
            answer.body
        );
    }
    let link = server
        .link(
            "gitlab",
            json!({"id_token": "x.y.z", "nonce": "n"}),
            &access,
        )
        .await;
    assert_eq!(
        (link.status, link.code()),
        (StatusCode::NOT_FOUND, "unknown_provider".into())
    );
    let unlink = server.unlink("Corp", &access).await;
    assert_eq!(
        (unlink.status, unlink.code()),
        (StatusCode::NOT_FOUND, "unknown_provider".into())
    );

    // A path segment is validated once percent-decoded: `%63orp` is `corp`.
    let encoded = server.get_as("/auth/%63orp/authorize", None).await;
    assert_eq!(encoded.status, StatusCode::FOUND, "{:?}", encoded.body);
    assert!(
        encoded
            .location()
            .as_str()
            .starts_with(&format!("{}/", corp.issuer())),
        "to corp's own authorization endpoint"
    );
}

/// A local address where nothing listens (a port just released).
async fn dead_issuer() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

/// Providers are discovered on their first sign-in, so the server starts while one is
/// down; that one answers 503 `provider_unavailable` and the others work.
#[tokio::test]
async fn the_server_starts_with_the_corp_issuer_down_and_google_still_works() {
    let Some(google) = OidcProvider::start().await else {
        return;
    };
    let server = start(&google, &dead_issuer().await, &[], |_| {}).await;
    let health = server.get_as("/health", None).await;
    assert_eq!(health.status, StatusCode::OK, "{:?}", health.body);
    assert_eq!(health.json["status"], "ok");

    let corp = server
        .get_as("/auth/corp/authorize?platform=web", None)
        .await;
    assert_eq!(
        (corp.status, corp.code()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "provider_unavailable".into()
        ),
        "{:?}",
        corp.body
    );
    assert!(
        !String::from_utf8_lossy(&corp.body).contains("127.0.0.1"),
        "no internal detail: {:?}",
        corp.body
    );
    assert!(
        corp.headers.get("set-cookie").is_none(),
        "no flow was begun"
    );
    let native = server
        .sign_in_native(
            "corp",
            json!({"id_token": "x.y.z", "nonce": "n", "platform": "ios"}),
        )
        .await;
    assert_eq!(
        (native.status, native.code()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "provider_unavailable".into()
        )
    );

    let signed_in = Browser::default()
        .sign_in_web(&server, "google", &json!({"sub": "while-corp-is-down"}))
        .await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    assert_eq!(providers_of(&signed_in.json["user"]), json!(["google"]));
    let access = signed_in.json["access_token"].as_str().unwrap().to_owned();
    let link = server
        .link("corp", json!({"id_token": "x.y.z", "nonce": "n2"}), &access)
        .await;
    assert_eq!(
        (link.status, link.code()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "provider_unavailable".into()
        )
    );
    assert_eq!(server.get_as("/health", None).await.status, StatusCode::OK);
}

/// A provider name that is also a path segment of another auth route (`link`, as in
/// `/auth/link/{provider}`) must either be refused by the configuration or sign in
/// like any other; it must not be accepted and then be unreachable.
#[tokio::test]
async fn a_provider_named_like_an_auth_route_is_refused_or_works() {
    let env = [
        ("OIDC_PROVIDERS", "link"),
        ("OIDC_LINK_ISSUER", "https://idp.example.com"),
        ("OIDC_LINK_CLIENT_ID", "id"),
        ("OIDC_LINK_CLIENT_SECRET", "s"),
    ];
    let read = ServerConfig::from_lookup(|n| {
        env.iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.to_string())
    });
    if let Err(errors) = read {
        assert_eq!(errors.variables().collect::<Vec<_>>(), ["OIDC_PROVIDERS"]);
        return;
    }
    let Some((google, corp)) = providers().await else {
        return;
    };
    let server = start(&google, corp.issuer(), &[], |config| {
        config.auth.openid[0].name = "link".parse().unwrap();
    })
    .await;
    let started = server
        .get_as("/auth/link/authorize?platform=web", None)
        .await;
    assert_eq!(
        started.status,
        StatusCode::FOUND,
        "OIDC_PROVIDERS=link was accepted, but its sign-in answers {}: {:?}",
        started.status,
        started.body
    );
}
