//! Facebook Login on the axum example, end to end over HTTP against the Graph API
//! stand-in (`upcoach_testing::facebook`, which requires `appsecret_proof`): the
//! browser and native sign-ins and their refusals, and, beside Google (the
//! `oauth2-mock-server` stand-in), a Google user linking and unlinking Facebook and
//! Facebook's deauthorize callback.

mod support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::{
    Answer, CLIENT_ID, FACEBOOK_APP_ID, FACEBOOK_APP_SECRET, RETURN_TO, send, urlencode,
};
use upcoach_testing::OidcProvider;
use upcoach_testing::facebook::{FacebookStandIn, FacebookUser};

fn carol() -> FacebookUser {
    FacebookUser::new("10150000000000003").with_email("carol@example.test")
}

fn param(url: &url::Url, name: &str) -> String {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no {name} in {url}"))
}

#[tokio::test]
async fn a_browser_and_an_app_sign_in_with_facebook_on_axum() {
    let graph = FacebookStandIn::start(FACEBOOK_APP_ID, FACEBOOK_APP_SECRET).await;
    let (addr, _app) = support::start_axum_facebook(&graph).await;
    let base = format!("http://{addr}");

    let started = send(
        Method::GET,
        &format!(
            "{base}/auth/facebook/authorize?platform=web&return_to={}",
            urlencode(RETURN_TO)
        ),
        &[],
        "",
    )
    .await;
    assert_eq!(started.status, StatusCode::FOUND, "{:?}", started.body);
    let cookie = started
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|c| c.to_str().unwrap().split(';').next().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join("; ");
    let dialog = started.location();
    let callback = format!("{base}/auth/facebook/callback");
    assert_eq!(param(&dialog, "redirect_uri"), callback);
    let code = graph.issue_code(carol(), &callback);
    let landed = send(
        Method::GET,
        &format!("{callback}?code={code}&state={}", param(&dialog, "state")),
        &[("cookie", &cookie)],
        "",
    )
    .await;
    assert_eq!(landed.status, StatusCode::FOUND, "{:?}", landed.body);
    let exchanged = send(
        Method::POST,
        &format!("{base}/auth/exchange"),
        &[("cookie", &cookie), ("content-type", "application/json")],
        &json!({"login_code": param(&landed.location(), "login_code")}).to_string(),
    )
    .await;
    assert_eq!(exchanged.status, StatusCode::OK, "{:?}", exchanged.body);

    let native = send(
        Method::POST,
        &format!("{base}/auth/facebook/token"),
        &[("content-type", "application/json")],
        &json!({"access_token": graph.issue_token(carol()), "platform": "android"}).to_string(),
    )
    .await;
    assert_eq!(native.status, StatusCode::OK, "{:?}", native.body);
    assert_eq!(native.json()["user"]["id"], exchanged.json()["user"]["id"]);

    let foreign = send(
        Method::POST,
        &format!("{base}/auth/facebook/token"),
        &[("content-type", "application/json")],
        &json!({"access_token": graph.issue_foreign_token(carol()), "platform": "android"})
            .to_string(),
    )
    .await;
    assert_eq!(foreign.status, StatusCode::UNAUTHORIZED);
    assert_eq!(foreign.code(), "facebook_token_foreign_app");
    assert_eq!(graph.proof_failures(), 0);
}

fn dave() -> FacebookUser {
    FacebookUser::new("10150000000000004").with_email("dave@example.test")
}

/// Dave's Google account: the same address as his Facebook profile, verified.
fn dave_google() -> Value {
    json!({"sub": "google-dave", "email": "dave@example.test", "email_verified": true})
}

/// `POST /auth/google/token` from the app, with an id token the Google stand-in
/// issues for `claims` with `nonce` (each sign-in its own nonce: a nonce is used once).
async fn sign_in_google(base: &str, google: &OidcProvider, nonce: &str, claims: &Value) -> Answer {
    let id_token = google.id_token(CLIENT_ID, nonce, claims).await;
    send(
        Method::POST,
        &format!("{base}/auth/google/token"),
        &[("content-type", "application/json")],
        &json!({"id_token": id_token, "nonce": nonce, "platform": "ios"}).to_string(),
    )
    .await
}

/// `POST /auth/facebook/token` from the app with the user `access_token`.
async fn sign_in_facebook(base: &str, access_token: &str) -> Answer {
    send(
        Method::POST,
        &format!("{base}/auth/facebook/token"),
        &[("content-type", "application/json")],
        &json!({"access_token": access_token, "platform": "ios"}).to_string(),
    )
    .await
}

/// `POST /auth/link/facebook` with the user `access_token` and `bearer`.
async fn link_facebook(base: &str, bearer: &str, access_token: &str) -> Answer {
    send(
        Method::POST,
        &format!("{base}/auth/link/facebook"),
        &[
            ("content-type", "application/json"),
            ("authorization", bearer),
        ],
        &json!({"access_token": access_token, "platform": "ios"}).to_string(),
    )
    .await
}

/// `DELETE /auth/link/{provider}` with `bearer`.
async fn unlink(base: &str, provider: &str, bearer: &str) -> Answer {
    send(
        Method::DELETE,
        &format!("{base}/auth/link/{provider}"),
        &[("authorization", bearer)],
        "",
    )
    .await
}

/// `GET /auth/me` with `bearer`.
async fn me(base: &str, bearer: &str) -> Answer {
    send(
        Method::GET,
        &format!("{base}/auth/me"),
        &[("authorization", bearer)],
        "",
    )
    .await
}

/// `POST /auth/refresh` of `refresh_token` (a native session: bound to no device).
async fn refresh(base: &str, refresh_token: &Value) -> Answer {
    send(
        Method::POST,
        &format!("{base}/auth/refresh"),
        &[("content-type", "application/json")],
        &json!({ "refresh_token": refresh_token }).to_string(),
    )
    .await
}

fn bearer(tokens: &Value) -> String {
    format!("Bearer {}", tokens["access_token"].as_str().unwrap())
}

/// A `signed_request` as Facebook posts it to the deauthorize callback for `user_id`,
/// issued now and signed with `app_secret`: `<signature>.<payload>`, the signature the
/// HMAC-SHA256 of the payload text, both unpadded base64url.
fn signed_request(user_id: &str, app_secret: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let payload = URL_SAFE_NO_PAD.encode(
        json!({"algorithm": "HMAC-SHA256", "issued_at": now, "user_id": user_id}).to_string(),
    );
    // `appsecret_proof` is that HMAC in hex.
    let hex = upcoach_testing::facebook::appsecret_proof(app_secret, &payload);
    let signature: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    format!("{}.{payload}", URL_SAFE_NO_PAD.encode(signature))
}

/// `POST /auth/facebook/deauthorize` with the form field `signed_request`.
async fn deauthorize(base: &str, signed_request: &str) -> Answer {
    send(
        Method::POST,
        &format!("{base}/auth/facebook/deauthorize"),
        &[("content-type", "application/x-www-form-urlencoded")],
        &format!("signed_request={}", urlencode(signed_request)),
    )
    .await
}

/// Dave signs in with Google, links Facebook, signs in with it as himself, and unlinks
/// it. Afterwards Facebook does not reach his account: a Facebook address is never
/// vouched for (Facebook does not say it verified it, so `email_verified` is false, and
/// the default `LinkingPolicy` does not trust Facebook's addresses anyway), so a first
/// sign-in of that identity whose address a user holds is rule 3 of `users.rs`: 409
/// `account_exists` (sign in as before, then link), neither linked back nor a second
/// account. That the store also remembers the unlink (rule 4) only matters for a
/// provider it trusts. He links it again; then Facebook's deauthorize callback unlinks
/// it (Google remains, and unlinking Google, now his last way in, is 409
/// `last_identity`) and ends every session of his, the ones begun with Google too,
/// while another user's session lives on. A profile without an address is then someone
/// new (rule 2), with Facebook alone.
#[tokio::test]
async fn a_google_user_links_and_unlinks_facebook_on_axum() {
    let Some(google) = OidcProvider::start().await else {
        return;
    };
    let graph = FacebookStandIn::start(FACEBOOK_APP_ID, FACEBOOK_APP_SECRET).await;
    let (addr, _app) = support::start_axum_facebook_and_google(&graph, &google).await;
    let base = format!("http://{addr}");

    let signed_in = sign_in_google(&base, &google, "fb-link-1", &dave_google()).await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    let signed_in = signed_in.json();
    let dave_id = signed_in["user"]["id"].clone();
    assert_eq!(signed_in["user"]["providers"], json!(["google"]));
    let dave_bearer = bearer(&signed_in);

    // Before he links it, his Facebook profile (the same address, unverified) is
    // refused: it names his account but cannot prove it.
    let before = sign_in_facebook(&base, &graph.issue_token(dave())).await;
    assert_eq!(
        (before.status, before.code()),
        (StatusCode::CONFLICT, "account_exists".into()),
        "{:?}",
        before.body
    );

    let linked = link_facebook(&base, &dave_bearer, &graph.issue_token(dave())).await;
    assert_eq!(linked.status, StatusCode::OK, "{:?}", linked.body);
    assert_eq!(linked.json()["id"], dave_id);
    assert_eq!(linked.json()["providers"], json!(["google", "facebook"]));
    let as_facebook = sign_in_facebook(&base, &graph.issue_token(dave())).await;
    assert_eq!(as_facebook.status, StatusCode::OK, "{:?}", as_facebook.body);
    let as_facebook = as_facebook.json();
    assert_eq!(as_facebook["user"]["id"], dave_id, "linked: the same user");
    assert_eq!(
        as_facebook["user"]["providers"],
        json!(["google", "facebook"])
    );

    let unlinked = unlink(&base, "facebook", &dave_bearer).await;
    assert_eq!(unlinked.status, StatusCode::OK, "{:?}", unlinked.body);
    assert_eq!(unlinked.json()["providers"], json!(["google"]));
    let gone = unlink(&base, "facebook", &dave_bearer).await;
    assert_eq!(
        (gone.status, gone.code()),
        (StatusCode::NOT_FOUND, "not_linked".into()),
        "{:?}",
        gone.body
    );
    let after = sign_in_facebook(&base, &graph.issue_token(dave())).await;
    assert_eq!(
        (after.status, after.code()),
        (StatusCode::CONFLICT, "account_exists".into()),
        "unlinked: Facebook does not reach his account: {:?}",
        after.body
    );
    let mine = me(&base, &dave_bearer).await;
    assert_eq!(mine.status, StatusCode::OK, "{:?}", mine.body);
    assert_eq!(mine.json()["providers"], json!(["google"]));

    // Linked again, Facebook signs him in again.
    let relinked = link_facebook(&base, &dave_bearer, &graph.issue_token(dave())).await;
    assert_eq!(relinked.status, StatusCode::OK, "{:?}", relinked.body);
    assert_eq!(relinked.json()["providers"], json!(["google", "facebook"]));
    let as_facebook = sign_in_facebook(&base, &graph.issue_token(dave())).await;
    assert_eq!(as_facebook.status, StatusCode::OK, "{:?}", as_facebook.body);
    let as_facebook = as_facebook.json();
    assert_eq!(
        as_facebook["user"]["id"], dave_id,
        "relinked: the same user"
    );

    // Someone else, signed in with Google, whose session the callback leaves alone.
    let erin = json!({"sub": "google-erin", "email": "erin@example.test", "email_verified": true});
    let bystander = sign_in_google(&base, &google, "fb-link-2", &erin).await;
    assert_eq!(bystander.status, StatusCode::OK, "{:?}", bystander.body);
    let bystander = bystander.json();

    // A request not signed with the app secret does nothing.
    let forged = deauthorize(&base, &signed_request(&dave().id, "another-secret")).await;
    assert_eq!(
        (forged.status, forged.code()),
        (
            StatusCode::UNAUTHORIZED,
            "signed_request_bad_signature".into()
        ),
        "{:?}",
        forged.body
    );
    let still = me(&base, &dave_bearer).await;
    assert_eq!(still.json()["providers"], json!(["google", "facebook"]));

    // Facebook says Dave removed the app: Facebook is unlinked and his sessions end.
    let request = signed_request(&dave().id, FACEBOOK_APP_SECRET);
    let deauthorized = deauthorize(&base, &request).await;
    assert_eq!(
        deauthorized.status,
        StatusCode::OK,
        "{:?}",
        deauthorized.body
    );
    assert_eq!(deauthorized.json(), json!({"status": "deauthorized"}));
    let mine = me(&base, &dave_bearer).await;
    assert_eq!(mine.status, StatusCode::OK, "{:?}", mine.body);
    assert_eq!(mine.json()["providers"], json!(["google"]));
    for (what, tokens) in [("Google", &signed_in), ("Facebook", &as_facebook)] {
        let ended = refresh(&base, &tokens["refresh_token"]).await;
        assert_eq!(
            (ended.status, ended.code()),
            (StatusCode::UNAUTHORIZED, "refresh_token_revoked".into()),
            "his {what} session: {:?}",
            ended.body
        );
    }
    let lives = refresh(&base, &bystander["refresh_token"]).await;
    assert_eq!(lives.status, StatusCode::OK, "{:?}", lives.body);
    // The same request again is answered as handled and does nothing more.
    let replayed = deauthorize(&base, &request).await;
    assert_eq!(replayed.status, StatusCode::OK, "{:?}", replayed.body);
    assert_eq!(replayed.json(), json!({"status": "deauthorized"}));

    // Google is now his only way in.
    let last = unlink(&base, "google", &dave_bearer).await;
    assert_eq!(
        (last.status, last.code()),
        (StatusCode::CONFLICT, "last_identity".into()),
        "{:?}",
        last.body
    );
    let after = sign_in_facebook(&base, &graph.issue_token(dave())).await;
    assert_eq!(
        (after.status, after.code()),
        (StatusCode::CONFLICT, "account_exists".into()),
        "unlinked by the callback: {:?}",
        after.body
    );
    // Without an address, that Facebook account names no one: someone new.
    let no_address = FacebookUser::new(dave().id);
    let alone = sign_in_facebook(&base, &graph.issue_token(no_address)).await;
    assert_eq!(alone.status, StatusCode::OK, "{:?}", alone.body);
    let alone = alone.json();
    assert_ne!(alone["user"]["id"], dave_id, "Facebook alone: someone new");
    assert_eq!(alone["user"]["providers"], json!(["facebook"]));
    let again = sign_in_google(&base, &google, "fb-link-3", &dave_google()).await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
    assert_eq!(again.json()["user"]["id"], dave_id);
    assert_eq!(again.json()["user"]["providers"], json!(["google"]));
    assert_eq!(graph.proof_failures(), 0);
}

/// While Dave's Facebook is linked to him, Erin (signed in with Google) cannot link it
/// to her account (409 `identity_taken`) nor unlink it from his (she has none: 404
/// `not_linked`), and Dave cannot link a second Facebook account beside his (409
/// `provider_already_linked`); his Facebook still signs him in, her account is as it
/// was.
#[tokio::test]
async fn a_second_user_cannot_take_a_linked_facebook_identity_on_axum() {
    let Some(google) = OidcProvider::start().await else {
        return;
    };
    let graph = FacebookStandIn::start(FACEBOOK_APP_ID, FACEBOOK_APP_SECRET).await;
    let (addr, _app) = support::start_axum_facebook_and_google(&graph, &google).await;
    let base = format!("http://{addr}");

    let dave_in = sign_in_google(&base, &google, "fb-taken-1", &dave_google()).await;
    assert_eq!(dave_in.status, StatusCode::OK, "{:?}", dave_in.body);
    let dave_in = dave_in.json();
    let dave_id = dave_in["user"]["id"].clone();
    let linked = link_facebook(&base, &bearer(&dave_in), &graph.issue_token(dave())).await;
    assert_eq!(linked.status, StatusCode::OK, "{:?}", linked.body);
    assert_eq!(linked.json()["providers"], json!(["google", "facebook"]));

    let erin = json!({"sub": "google-erin", "email": "erin@example.test", "email_verified": true});
    let erin_in = sign_in_google(&base, &google, "fb-taken-2", &erin).await;
    assert_eq!(erin_in.status, StatusCode::OK, "{:?}", erin_in.body);
    let erin_in = erin_in.json();
    assert_ne!(erin_in["user"]["id"], dave_id);
    let erin_bearer = bearer(&erin_in);

    let taken = link_facebook(&base, &erin_bearer, &graph.issue_token(dave())).await;
    assert_eq!(
        (taken.status, taken.code()),
        (StatusCode::CONFLICT, "identity_taken".into()),
        "{:?}",
        taken.body
    );
    let not_hers = unlink(&base, "facebook", &erin_bearer).await;
    assert_eq!(
        (not_hers.status, not_hers.code()),
        (StatusCode::NOT_FOUND, "not_linked".into()),
        "{:?}",
        not_hers.body
    );
    let second = FacebookUser::new("10150000000000005").with_email("dave@example.test");
    let beside = link_facebook(&base, &bearer(&dave_in), &graph.issue_token(second)).await;
    assert_eq!(
        (beside.status, beside.code()),
        (StatusCode::CONFLICT, "provider_already_linked".into()),
        "{:?}",
        beside.body
    );

    let hers = me(&base, &erin_bearer).await;
    assert_eq!(hers.status, StatusCode::OK, "{:?}", hers.body);
    assert_eq!(hers.json()["providers"], json!(["google"]));
    let as_facebook = sign_in_facebook(&base, &graph.issue_token(dave())).await;
    assert_eq!(as_facebook.status, StatusCode::OK, "{:?}", as_facebook.body);
    assert_eq!(as_facebook.json()["user"]["id"], dave_id, "still his");
    assert_eq!(
        as_facebook.json()["user"]["providers"],
        json!(["google", "facebook"])
    );
    assert_eq!(graph.proof_failures(), 0);
}
