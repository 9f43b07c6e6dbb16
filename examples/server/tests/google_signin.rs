//! Google sign-in end to end against an independent OpenID provider (npm
//! `oauth2-mock-server`): the browser flow with a login code, native sign-in by id token,
//! refresh rotation with reuse detection, linking rules, and the flow's refusals.

use std::net::SocketAddr;
use std::sync::Arc;
use upcoach_core::config::Settings;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use upcoach_core::event::EventKind;
use upcoach_server::{App, Options, ServeOptions, ServerConfig};
use upcoach_testing::OidcProvider;

const CLIENT_ID: &str = "upcoach-test-client";
const RETURN_TO: &str = "http://app.example.test/signed-in";

struct Server {
    addr: SocketAddr,
    app: Arc<App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _provider: OidcProvider,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The server with Google pointed at a fresh provider, or `None` (skip) without Node.
async fn start(edit: impl FnOnce(&mut ServerConfig)) -> Option<Server> {
    let provider = OidcProvider::start().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seed = URL_SAFE_NO_PAD.encode([7u8; 32]);
    let mut env = vec![
        ("UPCOACH_PUBLIC_URL".to_owned(), format!("http://{addr}")),
        ("AUTH_RETURN_TO_ALLOWLIST".to_owned(), RETURN_TO.to_owned()),
        ("AUTH_SIGNING_KEY".to_owned(), seed),
        ("GOOGLE_CLIENT_ID".to_owned(), CLIENT_ID.to_owned()),
        ("GOOGLE_CLIENT_SECRET".to_owned(), "test-secret".to_owned()),
        ("GOOGLE_ISSUER_URL".to_owned(), provider.issuer().to_owned()),
    ];
    env.push(("UPCOACH_ADDR".to_owned(), addr.to_string()));
    let mut config = ServerConfig::from_lookup(|name| {
        env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    })
    .unwrap();
    edit(&mut config);
    let app = App::start(config, Options::default())
        .await
        .expect("app starts");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(upcoach_server::serve(
        listener,
        app.service(),
        async {
            let _ = stopped.await;
        },
        ServeOptions::default(),
    ));
    Some(Server {
        addr,
        app,
        stop: Some(stop),
        _provider: provider,
    })
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }

    fn location(&self) -> url::Url {
        let location = self.headers["location"].to_str().unwrap();
        url::Url::parse(location).unwrap()
    }

    fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// One HTTP/1.1 request to `url` (any host:port), no redirects followed; a body is JSON
/// unless `headers` name another content type.
async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: Option<String>) -> Answer {
    let url = url::Url::parse(url).unwrap();
    let addr = format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port_or_known_default().unwrap()
    );
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let mut request = http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", url.authority());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let typed = headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
    if body.is_some() && !typed {
        request = request.header("content-type", "application/json");
    }
    let response = sender
        .send_request(
            request
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn post(&self, path: &str, body: Value, token: Option<&str>) -> Answer {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        send(
            Method::POST,
            &self.url(path),
            &headers,
            Some(body.to_string()),
        )
        .await
    }

    /// `POST /auth/refresh` `{"refresh_token"}` as API.md has it, from `browser`: with
    /// the cookies it holds (its device cookie) and nothing else.
    async fn refresh(&self, refresh_token: &Value, browser: &Browser) -> Answer {
        self.refresh_with(refresh_token, &browser.headers()).await
    }

    /// `POST /auth/refresh` `{"refresh_token"}` with `headers`.
    async fn refresh_with(&self, refresh_token: &Value, headers: &[(&str, &str)]) -> Answer {
        send(
            Method::POST,
            &self.url("/auth/refresh"),
            headers,
            Some(json!({"refresh_token": refresh_token}).to_string()),
        )
        .await
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Answer {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        send(Method::GET, &self.url(path), &headers, None).await
    }
}

/// A browser signing in: our authorize → the provider (with `claims` as its user) →
/// our callback. `cookie` is the `Cookie` header it sends us: every cookie we set on it
/// that it still keeps.
struct Browser {
    cookie: Option<String>,
}

fn hint(claims: &Value) -> String {
    URL_SAFE_NO_PAD.encode(claims.to_string())
}

impl Browser {
    /// Keeps the cookies `headers` set, as a browser does: each by name, removed by
    /// `Max-Age=0`.
    fn keep(&mut self, headers: &HeaderMap) {
        let mut jar: Vec<(String, String)> = self
            .cookie
            .iter()
            .flat_map(|c| c.split("; "))
            .filter_map(|pair| pair.split_once('='))
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect();
        for set in headers.get_all("set-cookie") {
            let set = set.to_str().unwrap();
            let (name, value) = set.split(';').next().unwrap().split_once('=').unwrap();
            jar.retain(|(n, _)| n != name);
            if !set.contains("Max-Age=0") {
                jar.push((name.to_owned(), value.to_owned()));
            }
        }
        self.cookie = (!jar.is_empty()).then(|| {
            jar.iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("; ")
        });
    }

    /// The value of our cookie `name` in this browser.
    fn get(&self, name: &str) -> Option<&str> {
        self.cookie
            .as_deref()?
            .split("; ")
            .filter_map(|pair| pair.split_once('='))
            .find_map(|(n, v)| (n == name).then_some(v))
    }

    /// The headers of a request from this browser to us: its cookies.
    fn headers(&self) -> Vec<(&str, &str)> {
        self.cookie.iter().map(|c| ("cookie", c.as_str())).collect()
    }

    /// Starts at `/auth/google/authorize?{query}`, keeping the cookies it sets; returns
    /// the provider's redirect to our callback (not yet followed).
    async fn start(&mut self, server: &Server, query: &str, claims: &Value) -> url::Url {
        let started = send(
            Method::GET,
            &server.url(&format!("/auth/google/authorize?{query}")),
            &self.headers(),
            None,
        )
        .await;
        assert_eq!(started.status, StatusCode::FOUND, "{:?}", started.body);
        for set_cookie in started.headers.get_all("set-cookie") {
            let set_cookie = set_cookie.to_str().unwrap();
            assert!(
                set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Lax"),
                "{set_cookie}"
            );
        }
        self.keep(&started.headers);
        let mut to_provider = started.location();
        let params: std::collections::HashMap<String, String> =
            to_provider.query_pairs().into_owned().collect();
        assert_eq!(params["code_challenge_method"], "S256");
        assert_eq!(params["response_type"], "code");
        assert_eq!(params["redirect_uri"], server.url("/auth/google/callback"));
        assert!(params["nonce"].len() >= 43 && params["state"].len() >= 43);
        to_provider
            .query_pairs_mut()
            .append_pair("login_hint", &hint(claims));
        let at_provider = send(Method::GET, to_provider.as_str(), &[], None).await;
        assert_eq!(at_provider.status, StatusCode::FOUND);
        at_provider.location()
    }

    /// `POST /auth/exchange` from this browser (with its cookies).
    async fn exchange(&self, server: &Server, body: Value) -> Answer {
        send(
            Method::POST,
            &server.url("/auth/exchange"),
            &self.headers(),
            Some(body.to_string()),
        )
        .await
    }

    async fn callback(&self, callback: &url::Url) -> Answer {
        send(Method::GET, callback.as_str(), &self.headers(), None).await
    }
}

fn user_claims() -> Value {
    json!({})
}

#[tokio::test]
async fn browser_sign_in_then_refresh_then_reuse_is_detected() {
    let Some(server) = start(|_| {}).await else {
        return;
    };
    let mut browser = Browser { cookie: None };
    let callback = browser
        .start(
            &server,
            &format!("platform=web&return_to={}", urlencode(RETURN_TO)),
            &user_claims(),
        )
        .await;
    let landed = browser.callback(&callback).await;
    assert_eq!(landed.status, StatusCode::FOUND, "{:?}", landed.body);
    let back = landed.location();
    assert_eq!(
        format!("{}://{}{}", back.scheme(), back.authority(), back.path()),
        RETURN_TO
    );
    let login_code: String = back
        .query_pairs()
        .find(|(k, _)| k == "login_code")
        .unwrap()
        .1
        .into_owned();
    assert!(
        !back.as_str().contains("access_token"),
        "never tokens in a URL"
    );

    let tokens = browser
        .exchange(&server, json!({"login_code": login_code}))
        .await;
    assert_eq!(tokens.status, StatusCode::OK, "{:?}", tokens.body);
    let tokens = tokens.json();
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
    let me = server.get("/auth/me", Some(access)).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json()["id"], tokens["user"]["id"]);

    // The session is bound to the device cookie authorize gave this browser, which it
    // sends on every refresh; the id is in no answer.
    assert!(tokens.get("device_id").is_none(), "{tokens}");
    let first = tokens["refresh_token"].as_str().unwrap().to_owned();
    let rotated = server.refresh(&json!(first), &browser).await;
    assert_eq!(rotated.status, StatusCode::OK, "{:?}", rotated.body);
    assert!(rotated.json().get("device_id").is_none());
    let second = rotated.json()["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(first, second);

    let reused = server.refresh(&json!(first), &browser).await;
    assert_eq!(
        (reused.status, reused.code()),
        (StatusCode::UNAUTHORIZED, "refresh_token_reused".into())
    );
    let after = server.refresh(&json!(second), &browser).await;
    assert_eq!(
        after.status,
        StatusCode::UNAUTHORIZED,
        "the whole family is revoked: {:?}",
        after.body
    );
    let events = server
        .app
        .event_log()
        .recent(EventKind::Security, 100)
        .await
        .unwrap();
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

    let jwks = server.get("/.well-known/jwks.json", None).await.json();
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn without_return_to_the_callback_answers_with_tokens_and_logout_revokes() {
    let Some(server) = start(|_| {}).await else {
        return;
    };
    let mut browser = Browser { cookie: None };
    let callback = browser.start(&server, "platform=web", &user_claims()).await;
    let answer = browser.callback(&callback).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let tokens = answer.json();
    let access = tokens["access_token"].as_str().unwrap();
    let out = server.post("/auth/logout", json!({}), Some(access)).await;
    assert_eq!(out.status, StatusCode::NO_CONTENT, "{:?}", out.body);
    let refresh = server.refresh(&tokens["refresh_token"], &browser).await;
    assert_eq!(
        (refresh.status, refresh.code()),
        (StatusCode::UNAUTHORIZED, "refresh_token_revoked".into())
    );
}

#[tokio::test]
async fn state_must_be_present_right_and_from_the_same_browser() {
    let Some(server) = start(|_| {}).await else {
        return;
    };
    let mut browser = Browser { cookie: None };
    let callback = browser.start(&server, "platform=web", &user_claims()).await;
    let code: String = callback
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();

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
    let wrong = Browser {
        cookie: browser.cookie.clone(),
    }
    .callback(
        &url::Url::parse(&server.url(&format!("/auth/google/callback?code={code}&state=forged")))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (wrong.status, wrong.code()),
        (StatusCode::UNAUTHORIZED, "state_invalid".into())
    );
    let other_browser = Browser {
        cookie: Some("upcoach_flow=someone-elses".into()),
    }
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
    let Some(server) = start(|_| {}).await else {
        return;
    };
    let mut browser = Browser { cookie: None };
    let callback = browser.start(&server, "platform=web", &user_claims()).await;
    assert_eq!(browser.callback(&callback).await.status, StatusCode::OK);
    let replay = browser.callback(&callback).await;
    assert_eq!(
        (replay.status, replay.code()),
        (StatusCode::UNAUTHORIZED, "state_invalid".into())
    );
}

#[tokio::test]
async fn return_to_must_be_exactly_on_the_allow_list() {
    let Some(server) = start(|_| {}).await else {
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
    let Some(server) = start(|c| {
        c.auth.google.as_mut().unwrap().hosted_domain = Some("example.com".into());
    })
    .await
    else {
        return;
    };
    let mut browser = Browser { cookie: None };
    let callback = browser
        .start(&server, "platform=web", &json!({"hd": "other.example"}))
        .await;
    let answer = browser.callback(&callback).await;
    assert_eq!(
        (answer.status, answer.code()),
        (StatusCode::UNAUTHORIZED, "wrong_hosted_domain".into())
    );
    let callback = browser
        .start(&server, "platform=web", &json!({"hd": "example.com"}))
        .await;
    assert_eq!(browser.callback(&callback).await.status, StatusCode::OK);
}

#[tokio::test]
async fn an_unverified_email_never_links_automatically() {
    let Some(server) = start(|_| {}).await else {
        return;
    };
    let mut browser = Browser { cookie: None };
    let first = browser
        .start(
            &server,
            "platform=web",
            &json!({"sub": "google-user-1", "email": "ana@example.test"}),
        )
        .await;
    assert_eq!(browser.callback(&first).await.status, StatusCode::OK);
    for verified in [json!(false), json!("false"), json!("true")] {
        let claims = json!({"sub": "google-user-2", "email": "ana@example.test", "email_verified": verified});
        let callback = browser.start(&server, "platform=web", &claims).await;
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
    let callback = browser.start(&server, "platform=web", &claims).await;
    let answer = browser.callback(&callback).await;
    assert_eq!(
        (answer.status, answer.code()),
        (StatusCode::CONFLICT, "account_exists".into())
    );
}

/// An id token for the native route, from the provider directly (an app's SDK would do this).
async fn native_id_token(server: &Server, nonce: &str, claims: &Value) -> String {
    let provider = server._provider.issuer();
    let mut authorize = url::Url::parse(&format!("{provider}/authorize")).unwrap();
    authorize
        .query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", CLIENT_ID)
        .append_pair("redirect_uri", "http://app.example.test/native")
        .append_pair("nonce", nonce)
        .append_pair("login_hint", &hint(claims));
    let redirected = send(Method::GET, authorize.as_str(), &[], None)
        .await
        .location();
    let code: String = redirected
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    let form = format!(
        "grant_type=authorization_code&code={code}&redirect_uri=http%3A%2F%2Fapp.example.test%2Fnative&client_id={CLIENT_ID}"
    );
    let url = url::Url::parse(&format!("{provider}/token")).unwrap();
    let stream = tokio::net::TcpStream::connect(format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port().unwrap()
    ))
    .await
    .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::post("/token")
        .header("host", url.authority())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(form)))
        .unwrap();
    let body = sender
        .send_request(request)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    body["id_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn native_sign_in_needs_the_nonce_once_and_linking_follows_the_rules() {
    let Some(server) = start(|_| {}).await else {
        return;
    };
    let id_token = native_id_token(&server, "native-nonce-1", &json!({"sub": "native-1"})).await;
    let missing = server
        .post(
            "/auth/google/token",
            json!({"id_token": id_token, "platform": "ios"}),
            None,
        )
        .await;
    assert_eq!(
        (missing.status, missing.code()),
        (StatusCode::UNAUTHORIZED, "nonce_required".into())
    );
    let wrong = server
        .post(
            "/auth/google/token",
            json!({"id_token": id_token, "nonce": "another", "platform": "ios"}),
            None,
        )
        .await;
    assert_eq!(
        (wrong.status, wrong.code()),
        (StatusCode::UNAUTHORIZED, "id_token_nonce_mismatch".into())
    );
    let signed_in = server
        .post(
            "/auth/google/token",
            json!({"id_token": id_token, "nonce": "native-nonce-1", "platform": "ios"}),
            None,
        )
        .await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    let replayed = server
        .post(
            "/auth/google/token",
            json!({"id_token": id_token, "nonce": "native-nonce-1", "platform": "ios"}),
            None,
        )
        .await;
    assert_eq!(
        (replayed.status, replayed.code()),
        (StatusCode::UNAUTHORIZED, "nonce_replayed".into())
    );

    let access = signed_in.json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let last = send(
        Method::DELETE,
        &server.url("/auth/link/google"),
        &[("authorization", &format!("Bearer {access}"))],
        None,
    )
    .await;
    assert_eq!(
        (last.status, last.code()),
        (StatusCode::CONFLICT, "last_identity".into())
    );
}

/// The login code of a finished browser sign-in (`return_to` set).
async fn login_code(server: &Server, browser: &mut Browser, query: &str, claims: &Value) -> String {
    let callback = browser.start(server, query, claims).await;
    let landed = browser.callback(&callback).await;
    assert_eq!(landed.status, StatusCode::FOUND, "{:?}", landed.body);
    landed
        .location()
        .query_pairs()
        .find(|(k, _)| k == "login_code")
        .unwrap()
        .1
        .into_owned()
}

/// Login CSRF: an attacker finishes a sign-in in their own browser and sends the victim
/// the `return_to?login_code=` link. The victim's browser has no (or another) flow
/// cookie, so the exchange is refused with its own code and the code is used up.
#[tokio::test]
async fn a_login_code_planted_from_another_browser_is_refused() {
    let Some(server) = start(|_| {}).await else {
        return;
    };
    let query = format!("platform=web&return_to={}", urlencode(RETURN_TO));
    let attacker_claims = json!({"sub": "attacker", "email": "attacker@example.test"});
    let mut attacker = Browser { cookie: None };
    let mut victim = Browser { cookie: None };
    // The victim has a flow cookie of its own from an abandoned sign-in.
    victim.start(&server, "platform=web", &user_claims()).await;
    for planted_in in [Browser { cookie: None }, victim] {
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
            planted_in.cookie
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
    let events = server
        .app
        .event_log()
        .recent(EventKind::Security, 100)
        .await
        .unwrap();
    assert!(
        events.iter().any(|e| e.name() == "login_code_refused"),
        "each planted code is recorded"
    );

    // A web app that cannot send the cookie to the API proves itself with the verifier
    // of the challenge it chose at authorize.
    let verifier = "a-verifier-this-web-app-chose-and-kept-in-session-storage";
    let challenge = URL_SAFE_NO_PAD.encode(<sha2::Sha256 as sha2::Digest>::digest(verifier));
    let query = format!("{query}&login_challenge={challenge}");
    let mut app_browser = Browser { cookie: None };
    let code = login_code(&server, &mut app_browser, &query, &user_claims()).await;
    let cookieless = Browser { cookie: None };
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
    let Some(server) = start(|_| {}).await else {
        return;
    };
    let mut browser = Browser { cookie: None };
    let mut sign_in = async |claims: Value| {
        let callback = browser.start(&server, "platform=web", &claims).await;
        let answer = browser.callback(&callback).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        answer.json()
    };
    let a = sign_in(json!({"sub": "user-a", "email": "a@example.test"})).await;
    let b = sign_in(json!({"sub": "user-b", "email": "b@example.test"})).await;
    let a_access = a["access_token"].as_str().unwrap();

    let refused = server
        .post(
            "/auth/logout",
            json!({"refresh_token": b["refresh_token"]}),
            Some(a_access),
        )
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (StatusCode::FORBIDDEN, "refresh_token_not_yours".into())
    );
    let b_refresh = server.refresh(&b["refresh_token"], &browser).await;
    assert_eq!(b_refresh.status, StatusCode::OK, "B's session lives on");
    let events = server
        .app
        .event_log()
        .recent(EventKind::Security, 100)
        .await
        .unwrap();
    assert!(
        events.iter().any(|e| e.name() == "logout_refused"),
        "the attempt is recorded"
    );

    let own = server
        .post(
            "/auth/logout",
            json!({"refresh_token": a["refresh_token"]}),
            Some(a_access),
        )
        .await;
    assert_eq!(own.status, StatusCode::NO_CONTENT, "{:?}", own.body);
    let after = server.refresh(&a["refresh_token"], &browser).await;
    assert_eq!(after.code(), "refresh_token_revoked");
}

/// JSON routes refuse anything but `application/json`: a cross-site `text/plain` or
/// form POST needs no CORS preflight and must not reach them.
#[tokio::test]
async fn json_routes_refuse_other_content_types() {
    let Some(server) = start(|_| {}).await else {
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
    let Some(server) = start(|_| {}).await else {
        return;
    };
    let mut browser = Browser { cookie: None };
    let callback = browser.start(&server, "platform=web", &user_claims()).await;
    let tokens = browser.callback(&callback).await.json();
    let stolen = server
        .post(
            "/auth/refresh",
            json!({"refresh_token": tokens["refresh_token"]}),
            None,
        )
        .await;
    assert_eq!(
        (stolen.status, stolen.code()),
        (StatusCode::UNAUTHORIZED, "device_mismatch".into())
    );
    let owner = server.refresh(&tokens["refresh_token"], &browser).await;
    assert_eq!(
        owner.code(),
        "refresh_token_revoked",
        "the session ended with the mismatch"
    );
    let events = server
        .app
        .event_log()
        .recent(EventKind::Security, 100)
        .await
        .unwrap();
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
    let id_token = native_id_token(&server, "device-nonce", &user_claims()).await;
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
    let tokens = signed_in.json();
    assert!(tokens.get("device_id").is_none(), "{tokens}");
    let rotated = server
        .refresh_with(
            &tokens["refresh_token"],
            &[("x-device-id", "6F9619FF-8B86-D011-B42D-00CF4FC964FF")],
        )
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{:?}", rotated.body);
    let invalid = send(
        Method::POST,
        &server.url("/auth/refresh"),
        &[("x-device-id", "not valid!")],
        Some(json!({"refresh_token": rotated.json()["refresh_token"]}).to_string()),
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
    let Some(server) = start(|_| {}).await else {
        return;
    };
    let mut browser = Browser { cookie: None };
    let callback = browser
        .start(
            &server,
            &format!("platform=web&return_to={}", urlencode(RETURN_TO)),
            &user_claims(),
        )
        .await;
    let device = browser
        .get("upcoach_device")
        .expect("authorize set a device cookie")
        .to_owned();
    assert_eq!(device.len(), 43);
    let landed = browser.callback(&callback).await;
    assert_eq!(landed.status, StatusCode::FOUND, "{:?}", landed.body);
    let code = landed
        .location()
        .query_pairs()
        .find(|(k, _)| k == "login_code")
        .unwrap()
        .1
        .into_owned();
    let exchanged = browser.exchange(&server, json!({"login_code": code})).await;
    assert_eq!(exchanged.status, StatusCode::OK, "{:?}", exchanged.body);
    browser.keep(&exchanged.headers);
    let tokens = exchanged.json();
    assert!(tokens.get("device_id").is_none(), "{tokens}");
    assert_eq!(
        browser.cookie.as_deref(),
        Some(format!("upcoach_device={device}").as_str()),
        "the flow cookie is gone, the device cookie stays"
    );

    // Twice, as a web app does over a session's life: the cookie alone carries it.
    let mut token = tokens["refresh_token"].clone();
    for _ in 0..2 {
        let rotated = server.refresh(&token, &browser).await;
        assert_eq!(rotated.status, StatusCode::OK, "{:?}", rotated.body);
        assert!(
            !String::from_utf8_lossy(&rotated.body).contains(&device),
            "the device id is in no answer"
        );
        token = rotated.json()["refresh_token"].clone();
    }

    // The same token from a client without the cookie: another device.
    let elsewhere = server.refresh_with(&token, &[]).await;
    assert_eq!(
        (elsewhere.status, elsewhere.code()),
        (StatusCode::UNAUTHORIZED, "device_mismatch".into())
    );
    let owner = server.refresh(&token, &browser).await;
    assert_eq!(
        owner.code(),
        "refresh_token_revoked",
        "the mismatch ended the session, for the browser too"
    );

    // The device id is in no security event.
    let events = server
        .app
        .event_log()
        .recent(EventKind::Security, 100)
        .await
        .unwrap();
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
    let graph_url = graph.graph_url();
    let dialog_url = format!("{}/v19.0/dialog/oauth", graph.base_url());
    let Some(server) = start(|config| {
        config.auth.facebook = upcoach_auth::config::AuthConfig::from_lookup(|name| match name {
            "FACEBOOK_APP_ID" => Some(APP_ID.into()),
            "FACEBOOK_APP_SECRET" => Some(APP_SECRET.into()),
            "FACEBOOK_GRAPH_URL" => Some(graph_url.clone()),
            "FACEBOOK_DIALOG_URL" => Some(dialog_url.clone()),
            _ => None,
        })
        .unwrap()
        .facebook;
    })
    .await
    else {
        return;
    };
    let dave = FacebookUser::new("10150000000000004").with_email("dave@example.test");
    let facebook_sign_in = |token: String| {
        let server = &server;
        async move {
            server
                .post(
                    "/auth/facebook/token",
                    json!({"access_token": token, "platform": "ios"}),
                    None,
                )
                .await
        }
    };

    let claims =
        json!({"sub": "google-dave", "email": "dave@example.test", "email_verified": true});
    let id_token = native_id_token(&server, "link-nonce-1", &claims).await;
    let google = server
        .post(
            "/auth/google/token",
            json!({"id_token": id_token, "nonce": "link-nonce-1", "platform": "ios"}),
            None,
        )
        .await;
    assert_eq!(google.status, StatusCode::OK, "{:?}", google.body);
    let user = google.json()["user"]["id"].clone();
    let access = google.json()["access_token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {access}");

    let linked = send(
        Method::POST,
        &server.url("/auth/link/facebook"),
        &[("authorization", &bearer)],
        Some(json!({"access_token": graph.issue_token(dave.clone())}).to_string()),
    )
    .await;
    assert!(linked.status.is_success(), "{:?}", linked.body);
    let as_facebook = facebook_sign_in(graph.issue_token(dave.clone())).await;
    assert_eq!(as_facebook.status, StatusCode::OK, "{:?}", as_facebook.body);
    assert_eq!(
        as_facebook.json()["user"]["id"],
        user,
        "linked: the same user"
    );

    let unlinked = send(
        Method::DELETE,
        &server.url("/auth/link/facebook"),
        &[("authorization", &bearer)],
        None,
    )
    .await;
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
    let relinked = send(
        Method::POST,
        &server.url("/auth/link/facebook"),
        &[("authorization", &bearer)],
        Some(json!({"access_token": graph.issue_token(dave.clone())}).to_string()),
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
    let refreshed = server
        .refresh_with(&google.json()["refresh_token"], &[])
        .await;
    assert_eq!(refreshed.code(), "refresh_token_revoked");
    let after = facebook_sign_in(graph.issue_token(dave.clone())).await;
    assert_eq!(after.code(), "account_exists", "unlinked by the callback");

    let last = send(
        Method::DELETE,
        &server.url("/auth/link/google"),
        &[("authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(
        (last.status, last.code()),
        (StatusCode::CONFLICT, "last_identity".into())
    );
    assert_eq!(graph.proof_failures(), 0);
}
