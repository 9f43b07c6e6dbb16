//! Google sign-in end to end against an independent OpenID provider (npm
//! `oauth2-mock-server`): the browser flow with a login code, native sign-in by id token,
//! refresh rotation with reuse detection, linking rules, and the flow's refusals.

mod support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::signin::{self, Browser, GOOGLE_CLIENT, google_env, param, urlencode};
use support::{RETURN_TO, Running, send};
use upcoach_server::ServerConfig;
use upcoach_testing::OidcProvider;

/// The server with Google pointed at a fresh provider, and the provider, or `None`
/// (skip) without Node.
async fn start(edit: impl FnOnce(&mut ServerConfig)) -> Option<(Running, OidcProvider)> {
    let provider = OidcProvider::start().await?;
    let server = Running::from_env(&google_env(&provider), edit).await;
    Some((server, provider))
}

fn user_claims() -> Value {
    json!({})
}

/// The query of a web sign-in that returns to the web app with a login code.
fn web_query() -> String {
    format!("platform=web&return_to={}", urlencode(RETURN_TO))
}

/// The server, and a browser that began a Google sign-in at authorize with `query` as
/// the default user: the provider's redirect to our callback, not yet followed. `None`
/// (skip) without Node.
async fn begun(query: &str) -> Option<(Running, OidcProvider, Browser, url::Url)> {
    let (server, google) = start(|_| {}).await?;
    let mut browser = Browser::default();
    let callback = browser
        .start(&server, "google", query, &user_claims())
        .await;
    Some((server, google, browser, callback))
}

#[tokio::test]
async fn browser_sign_in_then_refresh_then_reuse_is_detected() {
    let Some((server, _google, browser, callback)) = begun(&web_query()).await else {
        return;
    };
    let landed = browser.callback(&callback).await;
    assert_eq!(landed.status, StatusCode::FOUND, "{:?}", landed.body);
    let back = landed.location();
    assert_eq!(
        format!("{}://{}{}", back.scheme(), back.authority(), back.path()),
        RETURN_TO
    );
    let login_code = param(&back, "login_code");
    assert!(
        !back.as_str().contains("access_token"),
        "never tokens in a URL"
    );

    let tokens = browser
        .exchange(&server, json!({"login_code": login_code}))
        .await;
    assert_eq!(tokens.status, StatusCode::OK, "{:?}", tokens.body);
    let tokens = tokens.json;
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["user"]["email"], "johndoe@example.test");
    assert_eq!(tokens["user"]["providers"], json!(["google"]));
    let again = browser
        .exchange(&server, json!({"login_code": login_code}))
        .await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::UNAUTHORIZED, "login_code_invalid".into()),
        "one-time"
    );

    let access = tokens["access_token"].as_str().unwrap();
    let me = server.get_as("/auth/me", Some(access)).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json["id"], tokens["user"]["id"]);

    // The session is bound to the device cookie authorize gave this browser, which it
    // sends on every refresh; the id is in no answer.
    assert!(tokens.get("device_id").is_none(), "{tokens}");
    let first = tokens["refresh_token"].as_str().unwrap().to_owned();
    let rotated = browser.refresh(&server, &json!(first)).await;
    assert_eq!(rotated.status, StatusCode::OK, "{:?}", rotated.body);
    assert!(rotated.json.get("device_id").is_none());
    let second = rotated.json["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(first, second);

    let reused = browser.refresh(&server, &json!(first)).await;
    assert_eq!(
        (reused.status, reused.code()),
        (StatusCode::UNAUTHORIZED, "refresh_token_reused".into())
    );
    let after = browser.refresh(&server, &json!(second)).await;
    assert_eq!(
        after.status,
        StatusCode::UNAUTHORIZED,
        "the whole family is revoked: {:?}",
        after.body
    );
    let events = server.security_events().await;
    let names: Vec<&str> = events.iter().map(|e| e.name()).collect();
    assert!(
        names.contains(&"refresh_token_reused") && names.contains(&"login_success"),
        "{names:?}"
    );
    // Each security event carries the client's address and platform.
    for event in &events {
        let upcoach_core::event::Event::Security(event) = event else {
            continue;
        };
        assert_eq!(
            event.ip_address,
            Some("127.0.0.1".parse().unwrap()),
            "{event:?}"
        );
        if event.event_type == "login_success" {
            assert_eq!(event.platform.as_deref(), Some("web"), "{event:?}");
        }
    }

    let jwks = server.get_as("/.well-known/jwks.json", None).await.json;
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
}

#[tokio::test]
async fn without_return_to_the_callback_answers_with_tokens_and_logout_revokes() {
    let Some((server, _google, browser, callback)) = begun("platform=web").await else {
        return;
    };
    let answer = browser.callback(&callback).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let tokens = answer.json;
    let access = tokens["access_token"].as_str().unwrap();
    let out = server
        .send(Method::POST, "/auth/logout", Some(json!({})), Some(access))
        .await;
    assert_eq!(out.status, StatusCode::NO_CONTENT, "{:?}", out.body);
    let refresh = browser.refresh(&server, &tokens["refresh_token"]).await;
    assert_eq!(
        (refresh.status, refresh.code()),
        (StatusCode::UNAUTHORIZED, "refresh_token_revoked".into())
    );
}

#[tokio::test]
async fn state_must_be_present_right_and_from_the_same_browser() {
    let Some((server, _google, browser, callback)) = begun("platform=web").await else {
        return;
    };
    let code = param(&callback, "code");

    let no_state = send(
        Method::GET,
        &server.url(&format!("/auth/google/callback?code={code}")),
        &[],
        None,
    )
    .await;
    assert_eq!(
        (no_state.status, no_state.code()),
        (StatusCode::BAD_REQUEST, "state_missing".into())
    );
    let wrong = browser
        .clone()
        .callback(
            &url::Url::parse(
                &server.url(&format!("/auth/google/callback?code={code}&state=forged")),
            )
            .unwrap(),
        )
        .await;
    assert_eq!(
        (wrong.status, wrong.code()),
        (StatusCode::UNAUTHORIZED, "state_invalid".into())
    );
    let other_browser = Browser::holding("upcoach_flow", "someone-elses")
        .callback(&callback)
        .await;
    assert_eq!(
        (other_browser.status, other_browser.code()),
        (StatusCode::UNAUTHORIZED, "flow_browser_mismatch".into())
    );
    // The flow was used up by that attempt: even the right browser cannot replay it.
    let replay = browser.callback(&callback).await;
    assert_eq!(
        (replay.status, replay.code()),
        (StatusCode::UNAUTHORIZED, "state_invalid".into())
    );
}

#[tokio::test]
async fn a_replayed_callback_and_code_are_refused() {
    let Some((_server, _google, browser, callback)) = begun("platform=web").await else {
        return;
    };
    assert_eq!(browser.callback(&callback).await.status, StatusCode::OK);
    let replay = browser.callback(&callback).await;
    assert_eq!(
        (replay.status, replay.code()),
        (StatusCode::UNAUTHORIZED, "state_invalid".into())
    );
}

#[tokio::test]
async fn return_to_must_be_exactly_on_the_allow_list() {
    let Some((server, _google)) = start(|_| {}).await else {
        return;
    };
    for bad in [
        "http://app.example.test/signed-in/extra",
        "http://app.example.test/signed-in?next=/admin",
        "http://evil.example.test/signed-in",
        "http://app.example.test/other/../signed-in",
        "https://app.example.test/signed-in",
        "//evil.example.test",
    ] {
        let answer = send(
            Method::GET,
            &server.url(&format!(
                "/auth/google/authorize?return_to={}",
                urlencode(bad)
            )),
            &[],
            None,
        )
        .await;
        assert_eq!(
            (answer.status, answer.code()),
            (StatusCode::BAD_REQUEST, "return_to_not_allowed".into()),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn a_wrong_hosted_domain_is_refused() {
    let Some((server, _google)) = start(|c| {
        c.auth.google.as_mut().unwrap().hosted_domain = Some("example.com".into());
    })
    .await
    else {
        return;
    };
    let mut browser = Browser::default();
    let callback = browser
        .start(
            &server,
            "google",
            "platform=web",
            &json!({"hd": "other.example"}),
        )
        .await;
    let answer = browser.callback(&callback).await;
    assert_eq!(
        (answer.status, answer.code()),
        (StatusCode::UNAUTHORIZED, "wrong_hosted_domain".into())
    );
    let callback = browser
        .start(
            &server,
            "google",
            "platform=web",
            &json!({"hd": "example.com"}),
        )
        .await;
    assert_eq!(browser.callback(&callback).await.status, StatusCode::OK);
}

#[tokio::test]
async fn an_unverified_email_never_links_automatically() {
    let Some((server, _google)) = start(|_| {}).await else {
        return;
    };
    let mut browser = Browser::default();
    let first = browser
        .start(
            &server,
            "google",
            "platform=web",
            &json!({"sub": "google-user-1", "email": "ana@example.test"}),
        )
        .await;
    assert_eq!(browser.callback(&first).await.status, StatusCode::OK);
    for verified in [json!(false), json!("false"), json!("true")] {
        let claims = json!({"sub": "google-user-2", "email": "ana@example.test", "email_verified": verified});
        let callback = browser
            .start(&server, "google", "platform=web", &claims)
            .await;
        let answer = browser.callback(&callback).await;
        assert_eq!(
            (answer.status, answer.code()),
            (StatusCode::CONFLICT, "account_exists".into()),
            "{verified}"
        );
    }
    // A second Google identity never joins a user who has one (one per provider), even
    // with a verified address: automatic linking is across providers only.
    let claims =
        json!({"sub": "google-user-2", "email": "ANA@example.test", "email_verified": true});
    let callback = browser
        .start(&server, "google", "platform=web", &claims)
        .await;
    let answer = browser.callback(&callback).await;
    assert_eq!(
        (answer.status, answer.code()),
        (StatusCode::CONFLICT, "account_exists".into())
    );
}

/// An id token for the native route, from the provider directly (an app's SDK would do this).
async fn native_id_token(provider: &OidcProvider, nonce: &str, claims: &Value) -> String {
    provider.id_token(GOOGLE_CLIENT, nonce, claims).await
}

#[tokio::test]
async fn native_sign_in_needs_the_nonce_once_and_linking_follows_the_rules() {
    let Some((server, google)) = start(|_| {}).await else {
        return;
    };
    let id_token = native_id_token(&google, "native-nonce-1", &json!({"sub": "native-1"})).await;
    let with_nonce = async |nonce: Option<&str>| {
        let mut body = json!({"id_token": id_token, "platform": "ios"});
        if let Some(nonce) = nonce {
            body["nonce"] = json!(nonce);
        }
        server.sign_in_native("google", body).await
    };
    let missing = with_nonce(None).await;
    assert_eq!(
        (missing.status, missing.code()),
        (StatusCode::UNAUTHORIZED, "nonce_required".into())
    );
    let wrong = with_nonce(Some("another")).await;
    assert_eq!(
        (wrong.status, wrong.code()),
        (StatusCode::UNAUTHORIZED, "id_token_nonce_mismatch".into())
    );
    let signed_in = with_nonce(Some("native-nonce-1")).await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    let replayed = with_nonce(Some("native-nonce-1")).await;
    assert_eq!(
        (replayed.status, replayed.code()),
        (StatusCode::UNAUTHORIZED, "nonce_replayed".into())
    );

    let access = signed_in.json["access_token"].as_str().unwrap().to_owned();
    let last = server.unlink("google", &access).await;
    assert_eq!(
        (last.status, last.code()),
        (StatusCode::CONFLICT, "last_identity".into())
    );
}

/// The login code of a finished browser sign-in (`return_to` set).
async fn login_code(
    server: &Running,
    browser: &mut Browser,
    query: &str,
    claims: &Value,
) -> String {
    let landed = browser.sign_in(server, "google", query, claims).await;
    signin::login_code(&landed)
}

/// Login CSRF: an attacker finishes a sign-in in their own browser and sends the victim
/// the `return_to?login_code=` link. The victim's browser has no (or another) flow
/// cookie, so the exchange is refused with its own code and the code is used up.
#[tokio::test]
async fn a_login_code_planted_from_another_browser_is_refused() {
    let Some((server, _google)) = start(|_| {}).await else {
        return;
    };
    let query = web_query();
    let attacker_claims = json!({"sub": "attacker", "email": "attacker@example.test"});
    let mut attacker = Browser::default();
    let mut victim = Browser::default();
    // The victim has a flow cookie of its own from an abandoned sign-in.
    victim
        .start(&server, "google", "platform=web", &user_claims())
        .await;
    for planted_in in [Browser::default(), victim] {
        let code = login_code(&server, &mut attacker, &query, &attacker_claims).await;
        let answer = planted_in
            .exchange(&server, json!({"login_code": code}))
            .await;
        assert_eq!(
            (answer.status, answer.code()),
            (
                StatusCode::UNAUTHORIZED,
                "login_code_browser_mismatch".into()
            ),
            "cookie {:?}",
            planted_in.cookie()
        );
        let late = attacker
            .exchange(&server, json!({"login_code": code}))
            .await;
        assert_eq!(
            late.code(),
            "login_code_invalid",
            "a refused code is used up"
        );
    }
    let events = server.security_events().await;
    assert!(
        events.iter().any(|e| e.name() == "login_code_refused"),
        "each planted code is recorded"
    );

    // A web app that cannot send the cookie to the API proves itself with the verifier
    // of the challenge it chose at authorize.
    let verifier = "a-verifier-this-web-app-chose-and-kept-in-session-storage";
    let challenge = URL_SAFE_NO_PAD.encode(<sha2::Sha256 as sha2::Digest>::digest(verifier));
    let query = format!("{query}&login_challenge={challenge}");
    let mut app_browser = Browser::default();
    let code = login_code(&server, &mut app_browser, &query, &user_claims()).await;
    let cookieless = Browser::default();
    let wrong = cookieless
        .exchange(
            &server,
            json!({"login_code": code, "login_verifier": "guessed"}),
        )
        .await;
    assert_eq!(wrong.code(), "login_code_browser_mismatch");
    let code = login_code(&server, &mut app_browser, &query, &user_claims()).await;
    let right = cookieless
        .exchange(
            &server,
            json!({"login_code": code, "login_verifier": verifier}),
        )
        .await;
    assert_eq!(right.status, StatusCode::OK, "{:?}", right.body);
    let bad_challenge = send(
        Method::GET,
        &server.url("/auth/google/authorize?platform=web&login_challenge=short"),
        &[],
        None,
    )
    .await;
    assert_eq!(
        (bad_challenge.status, bad_challenge.code()),
        (StatusCode::BAD_REQUEST, "login_challenge_invalid".into())
    );
}

/// Logout with a bearer of user A and a refresh token of user B: 403, B's session
/// lives on, and the attempt is recorded.
#[tokio::test]
async fn logout_never_revokes_another_users_session() {
    let Some((server, _google)) = start(|_| {}).await else {
        return;
    };
    let mut browser = Browser::default();
    let mut sign_in = async |claims: Value| {
        let callback = browser
            .start(&server, "google", "platform=web", &claims)
            .await;
        let answer = browser.callback(&callback).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        answer.json
    };
    let a = sign_in(json!({"sub": "user-a", "email": "a@example.test"})).await;
    let b = sign_in(json!({"sub": "user-b", "email": "b@example.test"})).await;
    let a_access = a["access_token"].as_str().unwrap();

    let refused = server
        .send(
            Method::POST,
            "/auth/logout",
            Some(json!({"refresh_token": b["refresh_token"]})),
            Some(a_access),
        )
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (StatusCode::FORBIDDEN, "refresh_token_not_yours".into())
    );
    let b_refresh = browser.refresh(&server, &b["refresh_token"]).await;
    assert_eq!(b_refresh.status, StatusCode::OK, "B's session lives on");
    let events = server.security_events().await;
    assert!(
        events.iter().any(|e| e.name() == "logout_refused"),
        "the attempt is recorded"
    );

    let own = server
        .send(
            Method::POST,
            "/auth/logout",
            Some(json!({"refresh_token": a["refresh_token"]})),
            Some(a_access),
        )
        .await;
    assert_eq!(own.status, StatusCode::NO_CONTENT, "{:?}", own.body);
    let after = browser.refresh(&server, &a["refresh_token"]).await;
    assert_eq!(after.code(), "refresh_token_revoked");
}

/// JSON routes refuse anything but `application/json`: a cross-site `text/plain` or
/// form POST needs no CORS preflight and must not reach them.
#[tokio::test]
async fn json_routes_refuse_other_content_types() {
    let Some((server, _google)) = start(|_| {}).await else {
        return;
    };
    for path in ["/auth/refresh", "/auth/exchange", "/auth/google/token"] {
        for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
            let answer = send(
                Method::POST,
                &server.url(path),
                &[("content-type", content_type)],
                Some(r#"{"refresh_token":"x"}"#.to_owned()),
            )
            .await;
            assert_eq!(
                (answer.status, answer.code()),
                (
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type".into()
                ),
                "{path} {content_type}"
            );
        }
    }
}

/// A session is bound to its device: a browser's refresh token presented without the
/// device id the server gave it (or with another) is refused with `device_mismatch`,
/// ends the session and is recorded; a native app names its own device.
#[tokio::test]
async fn a_refresh_token_from_another_device_ends_its_session() {
    let Some((server, google, browser, callback)) = begun("platform=web").await else {
        return;
    };
    let signed_in = browser.callback(&callback).await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    let tokens = signed_in.json;
    let stolen = server
        .send(
            Method::POST,
            "/auth/refresh",
            Some(json!({"refresh_token": tokens["refresh_token"]})),
            None,
        )
        .await;
    assert_eq!(
        (stolen.status, stolen.code()),
        (StatusCode::UNAUTHORIZED, "device_mismatch".into())
    );
    let owner = browser.refresh(&server, &tokens["refresh_token"]).await;
    assert_eq!(
        owner.code(),
        "refresh_token_revoked",
        "the session ended with the mismatch"
    );
    let events = server.security_events().await;
    let mismatch = events
        .iter()
        .find_map(|e| match e {
            upcoach_core::event::Event::Security(e)
                if e.event_type == "refresh_device_mismatch" =>
            {
                Some(e)
            }
            _ => None,
        })
        .expect("a refresh_device_mismatch event");
    assert_eq!(mismatch.ip_address, Some("127.0.0.1".parse().unwrap()));
    assert_eq!(mismatch.details["device_id_presented"], false);

    // Native: the app's own device id, in X-Device-Id.
    let id_token = native_id_token(&google, "device-nonce", &user_claims()).await;
    let signed_in = send(
        Method::POST,
        &server.url("/auth/google/token"),
        &[("x-device-id", "6F9619FF-8B86-D011-B42D-00CF4FC964FF")],
        Some(json!({"id_token": id_token, "nonce": "device-nonce", "platform": "ios"}).to_string()),
    )
    .await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    assert!(
        signed_in.headers.get("set-cookie").is_none(),
        "no cookie for an app"
    );
    let tokens = signed_in.json;
    assert!(tokens.get("device_id").is_none(), "{tokens}");
    let rotated = server
        .refresh(
            &tokens["refresh_token"],
            &[("x-device-id", "6F9619FF-8B86-D011-B42D-00CF4FC964FF")],
        )
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{:?}", rotated.body);
    let invalid = send(
        Method::POST,
        &server.url("/auth/refresh"),
        &[("x-device-id", "not valid!")],
        Some(json!({"refresh_token": rotated.json["refresh_token"]}).to_string()),
    )
    .await;
    assert_eq!(
        (invalid.status, invalid.code()),
        (StatusCode::BAD_REQUEST, "invalid_device_id".into())
    );
}

/// A web app written to API.md, unchanged: authorize → callback → exchange, then
/// `POST /auth/refresh {"refresh_token"}` with only what its browser sends by itself
/// (the device cookie authorize set; no `X-Device-Id`) keeps its session. The same
/// refresh token from a client without that cookie (another device, or a cross-site
/// page, whose POST a `SameSite=Lax` cookie does not go with) is `device_mismatch`.
#[tokio::test]
async fn a_web_app_refreshes_with_the_device_cookie_its_browser_sends() {
    let Some((server, _google, mut browser, callback)) = begun(&web_query()).await else {
        return;
    };
    let device = browser
        .get("upcoach_device")
        .expect("authorize set a device cookie")
        .to_owned();
    assert_eq!(device.len(), 43);
    let landed = browser.callback(&callback).await;
    let exchanged = browser.finish(&server, &landed).await;
    assert_eq!(exchanged.status, StatusCode::OK, "{:?}", exchanged.body);
    let tokens = exchanged.json;
    assert!(tokens.get("device_id").is_none(), "{tokens}");
    assert_eq!(
        browser.cookie(),
        Some(format!("upcoach_device={device}").as_str()),
        "the flow cookie is gone, the device cookie stays"
    );

    // Twice, as a web app does over a session's life: the cookie alone carries it.
    let mut token = tokens["refresh_token"].clone();
    for _ in 0..2 {
        let rotated = browser.refresh(&server, &token).await;
        assert_eq!(rotated.status, StatusCode::OK, "{:?}", rotated.body);
        assert!(
            !String::from_utf8_lossy(&rotated.body).contains(&device),
            "the device id is in no answer"
        );
        token = rotated.json["refresh_token"].clone();
    }

    // The same token from a client without the cookie: another device.
    let elsewhere = server.refresh(&token, &[]).await;
    assert_eq!(
        (elsewhere.status, elsewhere.code()),
        (StatusCode::UNAUTHORIZED, "device_mismatch".into())
    );
    let owner = browser.refresh(&server, &token).await;
    assert_eq!(
        owner.code(),
        "refresh_token_revoked",
        "the mismatch ended the session, for the browser too"
    );

    // The device id is in no security event.
    let events = server.security_events().await;
    assert!(events.iter().any(|e| e.name() == "refresh_device_mismatch"));
    let text = format!("{events:?}");
    assert!(!text.contains(&device), "an event shows the device id");
}

/// Two providers on one server: a Google user links Facebook, signs in with it, and
/// unlinks it; the Facebook account then cannot sign in on its own, since its
/// (unverified) address names an existing account. Linked again, Facebook's
/// deauthorize callback unlinks it and ends the user's sessions.
#[tokio::test]
async fn a_google_user_links_and_unlinks_facebook() {
    use upcoach_testing::facebook::{FacebookStandIn, FacebookUser};
    const APP_ID: &str = "1234567890";
    const APP_SECRET: &str = "stand-in-app-secret";
    let graph = FacebookStandIn::start(APP_ID, APP_SECRET).await;
    let Some(provider) = OidcProvider::start().await else {
        return;
    };
    let env = [google_env(&provider), graph.env()].concat();
    let server = Running::from_env(&env, |_| {}).await;
    let dave = FacebookUser::new("10150000000000004").with_email("dave@example.test");
    let facebook_sign_in = async |token: String| {
        let body = json!({"access_token": token, "platform": "ios"});
        server.sign_in_native("facebook", body).await
    };

    let claims =
        json!({"sub": "google-dave", "email": "dave@example.test", "email_verified": true});
    let id_token = native_id_token(&provider, "link-nonce-1", &claims).await;
    let google = server
        .sign_in_native(
            "google",
            json!({"id_token": id_token, "nonce": "link-nonce-1", "platform": "ios"}),
        )
        .await;
    assert_eq!(google.status, StatusCode::OK, "{:?}", google.body);
    let user = google.json["user"]["id"].clone();
    let access = google.json["access_token"].as_str().unwrap().to_owned();

    let linked = server
        .link(
            "facebook",
            json!({"access_token": graph.issue_token(dave.clone())}),
            &access,
        )
        .await;
    assert!(linked.status.is_success(), "{:?}", linked.body);
    let as_facebook = facebook_sign_in(graph.issue_token(dave.clone())).await;
    assert_eq!(as_facebook.status, StatusCode::OK, "{:?}", as_facebook.body);
    assert_eq!(
        as_facebook.json["user"]["id"], user,
        "linked: the same user"
    );

    let unlinked = server.unlink("facebook", &access).await;
    assert!(unlinked.status.is_success(), "{:?}", unlinked.body);
    // Unlinked: Facebook's unverified address names an account, so the sign-in is
    // refused (sign in there, then link), neither linked back nor a second account.
    let after = facebook_sign_in(graph.issue_token(dave.clone())).await;
    assert_eq!(
        (after.status, after.code()),
        (StatusCode::CONFLICT, "account_exists".into()),
        "{:?}",
        after.body
    );

    // Linked again, then Facebook says the person removed the app: the identity is
    // unlinked (Google remains) and every session of the user ends.
    let relinked = server
        .link(
            "facebook",
            json!({"access_token": graph.issue_token(dave.clone())}),
            &access,
        )
        .await;
    assert!(relinked.status.is_success(), "{:?}", relinked.body);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let payload = URL_SAFE_NO_PAD.encode(
        json!({"algorithm": "HMAC-SHA256", "issued_at": now, "user_id": dave.id}).to_string(),
    );
    let proof = upcoach_testing::facebook::appsecret_proof(APP_SECRET, &payload);
    let signature: Vec<u8> = (0..proof.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&proof[i..i + 2], 16).unwrap())
        .collect();
    let form = format!(
        "signed_request={}.{payload}",
        URL_SAFE_NO_PAD.encode(signature)
    );
    let deauthorized = send(
        Method::POST,
        &server.url("/auth/facebook/deauthorize"),
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(form),
    )
    .await;
    assert_eq!(
        deauthorized.status,
        StatusCode::OK,
        "{:?}",
        deauthorized.body
    );
    let refreshed = server.refresh(&google.json["refresh_token"], &[]).await;
    assert_eq!(refreshed.code(), "refresh_token_revoked");
    let after = facebook_sign_in(graph.issue_token(dave.clone())).await;
    assert_eq!(after.code(), "account_exists", "unlinked by the callback");

    let last = server.unlink("google", &access).await;
    assert_eq!(
        (last.status, last.code()),
        (StatusCode::CONFLICT, "last_identity".into())
    );
    assert_eq!(graph.proof_failures(), 0);
}
