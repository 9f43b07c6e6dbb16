//! The Facebook Graph API stand-in, spoken to over HTTP/1.1 (`upcoach_testing::client`):
//! the code exchange, `debug_token`, `/me` with `appsecret_proof`, counters, bounds and odd input.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use upcoach_testing::facebook::{
    FOREIGN_APP_ID, FacebookStandIn, FacebookUser, MAX_TOKENS, appsecret_proof,
};

const APP_ID: &str = "1234567890";
const SECRET: &str = "s3cret";
const REDIRECT: &str = "https://app.example/auth/facebook/callback?x=1";

/// One answer: status, `Content-Type`, body as JSON (`Value::Null` when not JSON).
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: Value,
}

/// `method target` at `base_url`, without a body.
async fn send(base_url: &str, method: &str, target: &str) -> Answer {
    let answer = upcoach_testing::client::send(
        method.parse().expect("a method"),
        &format!("{base_url}{target}"),
        &[],
        Vec::new(),
    )
    .await;
    Answer {
        status: answer.status,
        content_type: answer.content_type().to_owned(),
        body: answer.json(),
    }
}

async fn get(graph: &FacebookStandIn, target: &str) -> Answer {
    send(&graph.base_url(), "GET", target).await
}

fn query(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

fn ada() -> FacebookUser {
    FacebookUser::new("10001")
        .with_name("Ada Lovelace")
        .with_email("ada@example.com")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn exchange(
    graph: &FacebookStandIn,
    id: &str,
    secret: &str,
    code: &str,
    redirect: &str,
) -> Answer {
    let q = query(&[
        ("client_id", id),
        ("redirect_uri", redirect),
        ("client_secret", secret),
        ("code", code),
    ]);
    get(graph, &format!("/v19.0/oauth/access_token?{q}")).await
}

async fn debug_token(graph: &FacebookStandIn, input_token: &str) -> Answer {
    let app_token = format!("{APP_ID}|{SECRET}");
    let proof = appsecret_proof(SECRET, &app_token);
    let q = query(&[
        ("input_token", input_token),
        ("access_token", &app_token),
        ("appsecret_proof", &proof),
    ]);
    get(graph, &format!("/v19.0/debug_token?{q}")).await
}

async fn me(
    graph: &FacebookStandIn,
    fields: Option<&str>,
    token: &str,
    proof: Option<&str>,
) -> Answer {
    let mut pairs = vec![("access_token", token)];
    if let Some(fields) = fields {
        pairs.push(("fields", fields));
    }
    if let Some(proof) = proof {
        pairs.push(("appsecret_proof", proof));
    }
    get(graph, &format!("/v19.0/me?{}", query(&pairs))).await
}

/// The error object of a 400, checked to be Facebook's shape.
fn error_of(answer: &Answer, status: u16, kind: &str, code: u64) -> Value {
    assert_eq!(answer.status, status, "{answer:?}");
    let error = answer.body["error"].clone();
    assert_eq!(error["type"], kind, "{answer:?}");
    assert_eq!(error["code"], code, "{answer:?}");
    assert!(error["message"].is_string(), "{answer:?}");
    error
}

#[test]
fn the_proof_is_rfc_4231_hmac_sha256_in_lowercase_hex() {
    // RFC 4231, test case 2.
    assert_eq!(
        appsecret_proof("Jefe", "what do ya want for nothing?"),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[tokio::test]
async fn base_url_is_loopback_without_trailing_slash() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let base = graph.base_url();
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");
    assert!(!base.ends_with('/'));
    assert_eq!(graph.graph_url(), format!("{base}/v19.0"));
}

#[tokio::test]
async fn a_code_is_exchanged_for_a_working_token() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let code = graph.issue_code(ada(), REDIRECT);
    let answer = exchange(&graph, APP_ID, SECRET, &code, REDIRECT).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.content_type.starts_with("application/json"));
    assert_eq!(answer.body["token_type"], "bearer");
    assert_eq!(answer.body["expires_in"], 5_183_944);
    let token = answer.body["access_token"]
        .as_str()
        .expect("a token")
        .to_owned();

    let debug = debug_token(&graph, &token).await;
    assert_eq!(debug.status, 200, "{debug:?}");
    assert_eq!(debug.body["data"]["is_valid"], true);
    assert_eq!(debug.body["data"]["user_id"], "10001");
    assert_eq!(debug.body["data"]["app_id"], APP_ID);

    let proof = appsecret_proof(SECRET, &token);
    let profile = me(&graph, Some("id,name,email"), &token, Some(&proof)).await;
    assert_eq!(profile.status, 200, "{profile:?}");
    assert_eq!(
        profile.body,
        json!({"id": "10001", "name": "Ada Lovelace", "email": "ada@example.com"})
    );
    assert_eq!(graph.calls("/v19.0/oauth/access_token"), 1);
    assert_eq!(graph.calls("/v19.0/debug_token"), 1);
    assert_eq!(graph.calls("/v19.0/me"), 1);
    assert_eq!(graph.proof_failures(), 0);
}

#[tokio::test]
async fn a_code_works_once() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let code = graph.issue_code(ada(), REDIRECT);
    assert_eq!(
        exchange(&graph, APP_ID, SECRET, &code, REDIRECT)
            .await
            .status,
        200
    );
    let again = exchange(&graph, APP_ID, SECRET, &code, REDIRECT).await;
    let error = error_of(&again, 400, "OAuthException", 100);
    assert_eq!(error["message"], "This authorization code has been used.");
}

#[tokio::test]
async fn a_wrong_secret_is_refused_and_still_consumes_the_code() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let code = graph.issue_code(ada(), REDIRECT);
    let wrong = exchange(&graph, APP_ID, "not-the-secret", &code, REDIRECT).await;
    error_of(&wrong, 400, "OAuthException", 100);
    assert!(wrong.body.get("access_token").is_none());
    let right = exchange(&graph, APP_ID, SECRET, &code, REDIRECT).await;
    let error = error_of(&right, 400, "OAuthException", 100);
    assert_eq!(error["message"], "This authorization code has been used.");
}

#[tokio::test]
async fn a_wrong_client_id_or_unknown_code_is_refused() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let code = graph.issue_code(ada(), REDIRECT);
    let wrong_id = exchange(&graph, "42", SECRET, &code, REDIRECT).await;
    error_of(&wrong_id, 400, "OAuthException", 100);
    let unknown = exchange(&graph, APP_ID, SECRET, "AQnot-a-code", REDIRECT).await;
    error_of(&unknown, 400, "OAuthException", 100);
}

#[tokio::test]
async fn a_different_redirect_uri_is_refused() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let code = graph.issue_code(ada(), REDIRECT);
    let other = exchange(
        &graph,
        APP_ID,
        SECRET,
        &code,
        "https://evil.example/callback",
    )
    .await;
    error_of(&other, 400, "OAuthException", 100);
    // Consumed: the right redirect_uri is too late.
    let right = exchange(&graph, APP_ID, SECRET, &code, REDIRECT).await;
    assert_eq!(right.status, 400, "{right:?}");
}

#[tokio::test]
async fn debug_token_describes_a_valid_token() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let token = graph.issue_token(ada());
    let answer = debug_token(&graph, &token).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let data = &answer.body["data"];
    assert_eq!(data["app_id"], APP_ID);
    assert_eq!(data["type"], "USER");
    assert_eq!(data["application"], "upcoach test");
    assert_eq!(data["is_valid"], true);
    assert_eq!(data["scopes"], json!(["email", "public_profile"]));
    assert_eq!(data["user_id"], "10001");
    let expires_at = data["expires_at"].as_u64().expect("expires_at");
    let now = unix_now();
    assert!(expires_at > now + 59 * 24 * 3600 && expires_at <= now + 61 * 24 * 3600);
    assert!(data["data_access_expires_at"].as_u64().expect("a time") > now);
    assert!(data.get("error").is_none());
}

#[tokio::test]
async fn debug_token_names_the_other_app_of_a_foreign_token() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let token = graph.issue_foreign_token(ada());
    let answer = debug_token(&graph, &token).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["data"]["app_id"], FOREIGN_APP_ID);
    assert_eq!(answer.body["data"]["app_id"], "999");
    assert_eq!(answer.body["data"]["is_valid"], true);
}

#[tokio::test]
async fn debug_token_reports_a_revoked_token_invalid_460() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let token = graph.issue_token(ada());
    graph.revoke(&token);
    let answer = debug_token(&graph, &token).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let data = &answer.body["data"];
    assert_eq!(data["is_valid"], false);
    assert_eq!(data["error"]["code"], 190);
    assert_eq!(data["error"]["subcode"], 460);
    assert_eq!(data["scopes"], json!([]));
    let proof = appsecret_proof(SECRET, &token);
    let profile = me(&graph, None, &token, Some(&proof)).await;
    let error = error_of(&profile, 400, "OAuthException", 190);
    assert_eq!(error["error_subcode"], 460);
}

#[tokio::test]
async fn debug_token_reports_an_expired_token_invalid_463() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let token = graph.issue_expired_token(ada());
    let answer = debug_token(&graph, &token).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let data = &answer.body["data"];
    assert_eq!(data["is_valid"], false);
    assert_eq!(data["error"]["code"], 190);
    assert_eq!(data["error"]["subcode"], 463);
    assert!(data["expires_at"].as_u64().expect("expires_at") < unix_now());
    let proof = appsecret_proof(SECRET, &token);
    let profile = me(&graph, None, &token, Some(&proof)).await;
    let error = error_of(&profile, 400, "OAuthException", 190);
    assert_eq!(error["error_subcode"], 463);
}

#[tokio::test]
async fn debug_token_reports_an_unknown_token_invalid() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let answer = debug_token(&graph, "EAAnot-a-token").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["data"]["is_valid"], false);
    assert_eq!(answer.body["data"]["error"]["code"], 190);
    assert_eq!(answer.body["data"]["scopes"], json!([]));
    assert!(answer.body["data"].get("user_id").is_none());
}

#[tokio::test]
async fn debug_token_refuses_a_wrong_app_token_or_proof() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let token = graph.issue_token(ada());
    let wrong_app_token = format!("{APP_ID}|guess");
    let q = query(&[
        ("input_token", &token),
        ("access_token", &wrong_app_token),
        (
            "appsecret_proof",
            &appsecret_proof("guess", &wrong_app_token),
        ),
    ]);
    let answer = get(&graph, &format!("/v19.0/debug_token?{q}")).await;
    error_of(&answer, 400, "OAuthException", 190);

    let app_token = format!("{APP_ID}|{SECRET}");
    let q = query(&[("input_token", &token), ("access_token", &app_token)]);
    let missing = get(&graph, &format!("/v19.0/debug_token?{q}")).await;
    let error = error_of(&missing, 400, "GraphMethodException", 100);
    assert_eq!(
        error["message"],
        "API calls from the server require an appsecret_proof argument"
    );
    // The proof of the user token, not of the app token that is this call's access_token.
    let q = query(&[
        ("input_token", &token),
        ("access_token", &app_token),
        ("appsecret_proof", &appsecret_proof(SECRET, &token)),
    ]);
    let wrong = get(&graph, &format!("/v19.0/debug_token?{q}")).await;
    let error = error_of(&wrong, 400, "GraphMethodException", 100);
    assert_eq!(
        error["message"],
        "Invalid appsecret_proof provided in the API argument"
    );
    assert_eq!(graph.proof_failures(), 2);
}

#[tokio::test]
async fn me_needs_the_right_proof() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let token = graph.issue_token(ada());

    let missing = me(&graph, Some("id,name,email"), &token, None).await;
    let error = error_of(&missing, 400, "GraphMethodException", 100);
    assert_eq!(
        error["message"],
        "API calls from the server require an appsecret_proof argument"
    );
    assert_eq!(graph.proof_failures(), 1);

    for wrong in [
        appsecret_proof("another-secret", &token),
        appsecret_proof(SECRET, &token).to_uppercase(),
        appsecret_proof(SECRET, "another-token"),
    ] {
        let answer = me(&graph, Some("id,name,email"), &token, Some(&wrong)).await;
        let error = error_of(&answer, 400, "GraphMethodException", 100);
        assert_eq!(
            error["message"],
            "Invalid appsecret_proof provided in the API argument"
        );
    }
    assert_eq!(graph.proof_failures(), 4);

    let right = appsecret_proof(SECRET, &token);
    let ok = me(&graph, Some("id,name,email"), &token, Some(&right)).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.body["email"], "ada@example.com");
    assert_eq!(graph.proof_failures(), 4);
    assert_eq!(graph.calls("/v19.0/me"), 5);
}

#[tokio::test]
async fn me_refuses_an_unknown_token() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let proof = appsecret_proof(SECRET, "EAAunknown");
    let answer = me(&graph, None, "EAAunknown", Some(&proof)).await;
    let error = error_of(&answer, 400, "OAuthException", 190);
    assert_eq!(error["message"], "Invalid OAuth access token.");
}

#[tokio::test]
async fn me_answers_only_the_asked_fields() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let token = graph.issue_token(ada());
    let proof = appsecret_proof(SECRET, &token);
    let cases = [
        (Some("id"), json!({"id": "10001"})),
        (
            Some("email"),
            json!({"id": "10001", "email": "ada@example.com"}),
        ),
        (
            Some("name, id"),
            json!({"id": "10001", "name": "Ada Lovelace"}),
        ),
        (None, json!({"id": "10001", "name": "Ada Lovelace"})),
    ];
    for (fields, expected) in cases {
        let answer = me(&graph, fields, &token, Some(&proof)).await;
        assert_eq!(answer.status, 200, "{fields:?}: {answer:?}");
        assert_eq!(answer.body, expected, "{fields:?}");
    }
    let unknown = me(&graph, Some("id,birthday"), &token, Some(&proof)).await;
    error_of(&unknown, 400, "GraphMethodException", 100);

    // A user without name or e-mail: absent fields are left out, not null.
    let bare = graph.issue_token(FacebookUser::new("20002"));
    let proof = appsecret_proof(SECRET, &bare);
    let answer = me(&graph, Some("id,name,email"), &bare, Some(&proof)).await;
    assert_eq!(answer.body, json!({"id": "20002"}));
}

#[tokio::test]
async fn odd_requests_get_json_errors_and_the_server_carries_on() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let unknown_path = get(&graph, "/v19.0/oauth/authorize?x=1").await;
    error_of(&unknown_path, 404, "OAuthException", 2500);
    let other_version = get(&graph, "/v18.0/me").await;
    assert_eq!(other_version.status, 404);
    assert_eq!(graph.calls("/v18.0/me"), 1);

    let token = graph.issue_token(ada());
    let bad_escapes = get(
        &graph,
        &format!("/v19.0/me?access_token={token}&appsecret_proof=%zz%"),
    )
    .await;
    error_of(&bad_escapes, 400, "GraphMethodException", 100);
    let huge = format!("/v19.0/me?access_token={}", "A".repeat(20_000));
    error_of(&get(&graph, &huge).await, 400, "OAuthException", 100);
    let twice = get(
        &graph,
        &format!("/v19.0/me?access_token={token}&access_token={token}"),
    )
    .await;
    error_of(&twice, 400, "OAuthException", 100);
    let post = send(&graph.base_url(), "POST", "/v19.0/me").await;
    assert_eq!(post.status, 400, "{post:?}");
    let no_query = get(&graph, "/v19.0/debug_token").await;
    assert_eq!(no_query.status, 400, "{no_query:?}");
    assert!(no_query.content_type.starts_with("application/json"));

    let code = graph.issue_code(ada(), REDIRECT);
    assert_eq!(
        exchange(&graph, APP_ID, SECRET, &code, REDIRECT)
            .await
            .status,
        200
    );
}

#[tokio::test]
#[should_panic(expected = "at most 10000 tokens")]
async fn issuing_is_bounded() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    for n in 0..MAX_TOKENS {
        graph.issue_token(FacebookUser::new(n.to_string()));
    }
    graph.issue_token(ada());
}

#[tokio::test]
async fn dropping_the_stand_in_stops_it() {
    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let addr = graph.addr();
    assert_eq!(get(&graph, "/v19.0/me").await.status, 400);
    drop(graph);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening"
    );

    let graph = FacebookStandIn::start(APP_ID, SECRET).await;
    let addr = graph.addr();
    graph.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening"
    );
}
