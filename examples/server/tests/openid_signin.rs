//! A generic OpenID Connect provider beside Google on the reference server, configured
//! by environment variables only (`OIDC_PROVIDERS=corp`, `OIDC_CORP_*`), each provider
//! an independent OpenID provider (npm `oauth2-mock-server`): sign-in, linking and
//! unlinking under the provider's own name, trusted-for-linking, unknown names, and a
//! server that starts while the provider is down.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use upcoach_core::config::{ServiceUrl, Settings};
use upcoach_core::event::{Event, EventKind};
use upcoach_server::{App, Options, ServeOptions, ServerConfig};
use upcoach_testing::{OidcProvider, PgSchema, RedisPrefix};

const GOOGLE_CLIENT: &str = "upcoach-test-client";
const CORP_CLIENT: &str = "corp-web-client";
const RETURN_TO: &str = "http://app.example.test/signed-in";

struct Server {
    addr: SocketAddr,
    app: Arc<App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Google at `google` and `corp` at `corp_issuer` (`OIDC_PROVIDERS=corp`), plus
/// `extra` variables; `edit` changes the configuration read from them.
async fn start(
    google: &OidcProvider,
    corp_issuer: &str,
    extra: &[(&str, &str)],
    edit: impl FnOnce(&mut ServerConfig),
) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut env = vec![
        ("UPCOACH_ADDR".to_owned(), addr.to_string()),
        ("UPCOACH_PUBLIC_URL".to_owned(), format!("http://{addr}")),
        ("AUTH_RETURN_TO_ALLOWLIST".to_owned(), RETURN_TO.to_owned()),
        (
            "AUTH_SIGNING_KEY".to_owned(),
            URL_SAFE_NO_PAD.encode([7u8; 32]),
        ),
        ("GOOGLE_CLIENT_ID".to_owned(), GOOGLE_CLIENT.to_owned()),
        (
            "GOOGLE_CLIENT_SECRET".to_owned(),
            "google-secret".to_owned(),
        ),
        ("GOOGLE_ISSUER_URL".to_owned(), google.issuer().to_owned()),
        ("OIDC_PROVIDERS".to_owned(), "corp".to_owned()),
        ("OIDC_CORP_ISSUER".to_owned(), corp_issuer.to_owned()),
        ("OIDC_CORP_CLIENT_ID".to_owned(), CORP_CLIENT.to_owned()),
        (
            "OIDC_CORP_CLIENT_SECRET".to_owned(),
            "corp-secret".to_owned(),
        ),
    ];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let mut config = ServerConfig::from_lookup(|name| {
        env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    })
    .unwrap();
    assert_eq!(config.auth.openid.len(), 1);
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
    Server {
        addr,
        app,
        stop: Some(stop),
    }
}

/// Two independent providers (Google's and corp's), or `None` (skip) without Node.
async fn providers() -> Option<(OidcProvider, OidcProvider)> {
    Some((OidcProvider::start().await?, OidcProvider::start().await?))
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
        url::Url::parse(self.headers["location"].to_str().unwrap()).unwrap()
    }

    fn code(&self) -> String {
        let json: Value = serde_json::from_slice(&self.body).unwrap_or_default();
        json["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// One HTTP/1.1 request to `url`, no redirects followed; a body is JSON unless
/// `headers` name another content type.
async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: Option<String>) -> Answer {
    let url = url::Url::parse(url).unwrap();
    let stream = tokio::net::TcpStream::connect(url.socket_addrs(|| None).unwrap()[0])
        .await
        .unwrap();
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

    async fn get(&self, path: &str, token: Option<&str>) -> Answer {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("authorization", b.as_str()))
            .collect();
        send(Method::GET, &self.url(path), &headers, None).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> Answer {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("authorization", b.as_str()))
            .collect();
        send(
            method,
            &self.url(path),
            &headers,
            body.map(|b| b.to_string()),
        )
        .await
    }
}

/// A browser: the cookies we set on it, sent back on each request to us.
#[derive(Default)]
struct Browser {
    cookie: Option<String>,
}

fn hint(claims: &Value) -> String {
    URL_SAFE_NO_PAD.encode(claims.to_string())
}

fn param(url: &url::Url, name: &str) -> String {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no {name} in {url}"))
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Browser {
    /// Keeps the cookies `headers` set, each by name, removed by `Max-Age=0`.
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

    fn headers(&self) -> Vec<(&str, &str)> {
        self.cookie.iter().map(|c| ("cookie", c.as_str())).collect()
    }

    /// `/auth/{provider}/authorize?{query}`, then the provider (signing in as `claims`),
    /// then our callback: the callback's answer.
    async fn sign_in(
        &mut self,
        server: &Server,
        provider: &str,
        query: &str,
        claims: &Value,
    ) -> Answer {
        let started = send(
            Method::GET,
            &server.url(&format!("/auth/{provider}/authorize?{query}")),
            &self.headers(),
            None,
        )
        .await;
        assert_eq!(started.status, StatusCode::FOUND, "{:?}", started.body);
        self.keep(&started.headers);
        let mut to_provider = started.location();
        assert_eq!(
            param(&to_provider, "redirect_uri"),
            server.url(&format!("/auth/{provider}/callback"))
        );
        assert_eq!(param(&to_provider, "code_challenge_method"), "S256");
        to_provider
            .query_pairs_mut()
            .append_pair("login_hint", &hint(claims));
        let at_provider = send(Method::GET, to_provider.as_str(), &[], None).await;
        assert_eq!(
            at_provider.status,
            StatusCode::FOUND,
            "{:?}",
            at_provider.body
        );
        let callback = at_provider.location();
        send(Method::GET, callback.as_str(), &self.headers(), None).await
    }

    /// A web sign-in with `provider` as API.md has it: authorize with `return_to`, the
    /// provider, our callback's redirect with a login code, and `POST /auth/exchange`
    /// from this browser. The exchange's answer.
    async fn sign_in_web(&mut self, server: &Server, provider: &str, claims: &Value) -> Answer {
        let query = format!("platform=web&return_to={}", urlencode(RETURN_TO));
        let landed = self.sign_in(server, provider, &query, claims).await;
        if landed.status != StatusCode::FOUND {
            return landed;
        }
        let back = landed.location();
        assert!(back.as_str().starts_with(RETURN_TO), "{back}");
        let code = param(&back, "login_code");
        let exchanged = send(
            Method::POST,
            &server.url("/auth/exchange"),
            &self.headers(),
            Some(json!({ "login_code": code }).to_string()),
        )
        .await;
        self.keep(&exchanged.headers);
        exchanged
    }
}

/// An id token `issuer` issues to `client_id` for `claims` with `nonce`, as a native
/// app's SDK obtains one.
async fn native_id_token(issuer: &str, client_id: &str, nonce: &str, claims: &Value) -> String {
    let mut authorize = url::Url::parse(&format!("{issuer}/authorize")).unwrap();
    authorize
        .query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", client_id)
        .append_pair("redirect_uri", "http://app.example.test/native")
        .append_pair("nonce", nonce)
        .append_pair("login_hint", &hint(claims));
    let redirected = send(Method::GET, authorize.as_str(), &[], None).await;
    assert_eq!(
        redirected.status,
        StatusCode::FOUND,
        "{:?}",
        redirected.body
    );
    let code = param(&redirected.location(), "code");
    let form = format!(
        "grant_type=authorization_code&code={code}&redirect_uri={}&client_id={client_id}",
        urlencode("http://app.example.test/native")
    );
    let answer = send(
        Method::POST,
        &format!("{issuer}/token"),
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(form),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    answer.json()["id_token"].as_str().unwrap().to_owned()
}

fn providers_of(user: &Value) -> Value {
    user["providers"].clone()
}

/// The core path: a Google user links corp, signs in with it, unlinks it; corp then
/// signs in someone else as a new user, and the unlinked corp account (an untrusted
/// provider by default) cannot sign in on its own while its address names the Google
/// user.
async fn google_user_links_and_unlinks_corp(server: &Server, corp: &OidcProvider) {
    let dave_google =
        json!({"sub": "google-dave", "email": "dave@example.test", "email_verified": true});
    let dave_corp =
        json!({"sub": "corp-dave", "email": "dave@example.test", "email_verified": true});

    let mut browser = Browser::default();
    let signed_in = browser.sign_in_web(server, "google", &dave_google).await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    let tokens = signed_in.json();
    let user = tokens["user"]["id"].clone();
    assert_eq!(providers_of(&tokens["user"]), json!(["google"]));
    let access = tokens["access_token"].as_str().unwrap().to_owned();

    // Link corp with an id token its app obtained (the body of /auth/corp/token).
    let id_token = native_id_token(corp.issuer(), CORP_CLIENT, "link-corp-1", &dave_corp).await;
    let linked = server
        .send(
            Method::POST,
            "/auth/link/corp",
            Some(json!({"id_token": id_token, "nonce": "link-corp-1", "platform": "ios"})),
            Some(&access),
        )
        .await;
    assert_eq!(linked.status, StatusCode::OK, "{:?}", linked.body);
    assert_eq!(linked.json()["id"], user);
    assert_eq!(providers_of(&linked.json()), json!(["google", "corp"]));
    let replayed = server
        .send(
            Method::POST,
            "/auth/link/corp",
            Some(json!({"id_token": id_token, "nonce": "link-corp-1", "platform": "ios"})),
            Some(&access),
        )
        .await;
    assert_eq!(
        (replayed.status, replayed.code()),
        (StatusCode::UNAUTHORIZED, "nonce_replayed".into())
    );

    let me = server.get("/auth/me", Some(&access)).await;
    assert_eq!(me.status, StatusCode::OK, "{:?}", me.body);
    assert_eq!(providers_of(&me.json()), json!(["google", "corp"]));

    // Linked: corp's browser sign-in finds the same user.
    let as_corp = Browser::default()
        .sign_in_web(server, "corp", &dave_corp)
        .await;
    assert_eq!(as_corp.status, StatusCode::OK, "{:?}", as_corp.body);
    assert_eq!(as_corp.json()["user"]["id"], user, "linked: the same user");
    // And natively, with the corp app's token.
    let id_token = native_id_token(corp.issuer(), CORP_CLIENT, "corp-native-1", &dave_corp).await;
    let native = server
        .send(
            Method::POST,
            "/auth/corp/token",
            Some(json!({"id_token": id_token, "nonce": "corp-native-1", "platform": "android"})),
            None,
        )
        .await;
    assert_eq!(native.status, StatusCode::OK, "{:?}", native.body);
    assert_eq!(native.json()["user"]["id"], user);

    let unlinked = server
        .send(Method::DELETE, "/auth/link/corp", None, Some(&access))
        .await;
    assert_eq!(unlinked.status, StatusCode::OK, "{:?}", unlinked.body);
    assert_eq!(providers_of(&unlinked.json()), json!(["google"]));
    let me = server.get("/auth/me", Some(&access)).await;
    assert_eq!(providers_of(&me.json()), json!(["google"]));
    let again = server
        .send(Method::DELETE, "/auth/link/corp", None, Some(&access))
        .await;
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
    let erin_user = new_person.json()["user"].clone();
    assert_ne!(erin_user["id"], user, "a different user");
    assert_eq!(providers_of(&erin_user), json!(["corp"]));
    assert_eq!(erin_user["email"], "erin@corp.example");
    let erin_access = new_person.json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let last = server
        .send(Method::DELETE, "/auth/link/corp", None, Some(&erin_access))
        .await;
    assert_eq!(
        (last.status, last.code()),
        (StatusCode::CONFLICT, "last_identity".into())
    );

    // The security events name the provider.
    let events = server
        .app
        .event_log()
        .recent(EventKind::Security, 200)
        .await
        .unwrap();
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
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let Some((google, corp)) = providers().await else {
        return;
    };
    let mut database = url::Url::parse(schema.url()).unwrap();
    database
        .query_pairs_mut()
        .append_pair("options", &format!("-c search_path={}", schema.name()));
    let server = start(&google, corp.issuer(), &[], |config| {
        config.cache.prefix = prefix.prefix().trim_end_matches(':').to_owned();
        config.services.database_url =
            Some(ServiceUrl::parse(database.as_str(), &["postgres"]).unwrap());
        config.services.redis_url = Some(ServiceUrl::parse(prefix.url(), &["redis"]).unwrap());
    })
    .await;
    assert!(server.app.backends().postgres.is_some() && server.app.backends().redis.is_some());
    google_user_links_and_unlinks_corp(&server, &corp).await;
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT provider FROM user_identities ORDER BY provider")
            .fetch_all(schema.pool())
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
    let user = first.json()["user"]["id"].clone();
    let linked = Browser::default()
        .sign_in_web(&trusted, "corp", &erin_corp)
        .await;
    assert_eq!(linked.status, StatusCode::OK, "{:?}", linked.body);
    assert_eq!(linked.json()["user"]["id"], user, "linked automatically");
    assert_eq!(
        providers_of(&linked.json()["user"]),
        json!(["google", "corp"])
    );
    // Natively too (another address, another user).
    let frank_google =
        json!({"sub": "google-frank", "email": "frank@example.test", "email_verified": true});
    let frank = Browser::default()
        .sign_in_web(&trusted, "google", &frank_google)
        .await
        .json()["user"]["id"]
        .clone();
    let frank_corp =
        json!({"sub": "corp-frank", "email": "frank@example.test", "email_verified": true});
    let id_token = native_id_token(corp.issuer(), CORP_CLIENT, "trusted-1", &frank_corp).await;
    let native = trusted
        .send(
            Method::POST,
            "/auth/corp/token",
            Some(json!({"id_token": id_token, "nonce": "trusted-1", "platform": "ios"})),
            None,
        )
        .await;
    assert_eq!(native.status, StatusCode::OK, "{:?}", native.body);
    assert_eq!(native.json()["user"]["id"], frank);
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
        let id_token = native_id_token(corp.issuer(), CORP_CLIENT, "untrusted-1", &erin_corp).await;
        let native = untrusted
            .send(
                Method::POST,
                "/auth/corp/token",
                Some(json!({"id_token": id_token, "nonce": "untrusted-1", "platform": "ios"})),
                None,
            )
            .await;
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
        .json()["access_token"]
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
        .send(
            Method::POST,
            "/auth/link/gitlab",
            Some(json!({"id_token": "x.y.z", "nonce": "n"})),
            Some(&access),
        )
        .await;
    assert_eq!(
        (link.status, link.code()),
        (StatusCode::NOT_FOUND, "unknown_provider".into())
    );
    let unlink = server
        .send(Method::DELETE, "/auth/link/Corp", None, Some(&access))
        .await;
    assert_eq!(
        (unlink.status, unlink.code()),
        (StatusCode::NOT_FOUND, "unknown_provider".into())
    );

    // A path segment is validated once percent-decoded: `%63orp` is `corp`.
    let encoded = server.get("/auth/%63orp/authorize", None).await;
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
    let health = server.get("/health", None).await;
    assert_eq!(health.status, StatusCode::OK, "{:?}", health.body);
    assert_eq!(health.json()["status"], "ok");

    let corp = server.get("/auth/corp/authorize?platform=web", None).await;
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
        .send(
            Method::POST,
            "/auth/corp/token",
            Some(json!({"id_token": "x.y.z", "nonce": "n", "platform": "ios"})),
            None,
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
    assert_eq!(providers_of(&signed_in.json()["user"]), json!(["google"]));
    let access = signed_in.json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let link = server
        .send(
            Method::POST,
            "/auth/link/corp",
            Some(json!({"id_token": "x.y.z", "nonce": "n2"})),
            Some(&access),
        )
        .await;
    assert_eq!(
        (link.status, link.code()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "provider_unavailable".into()
        )
    );
    assert_eq!(server.get("/health", None).await.status, StatusCode::OK);
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
    let started = server.get("/auth/link/authorize?platform=web", None).await;
    assert_eq!(
        started.status,
        StatusCode::FOUND,
        "OIDC_PROVIDERS=link was accepted, but its sign-in answers {}: {:?}",
        started.status,
        started.body
    );
}
