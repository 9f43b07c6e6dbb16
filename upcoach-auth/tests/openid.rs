//! Any OpenID Connect provider by configuration ([`OpenIdProvider`]), against two
//! independent OpenID providers (npm `oauth2-mock-server`, tests/js/oidc/provider.mjs):
//! the code flow under a name of our choosing, lazy discovery (nothing fetched when
//! made, a failed discovery retried only after [`DISCOVERY_RETRY`]), scopes, audiences,
//! and one provider's id tokens refused by another.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use upcoach_auth::config::AuthConfig;
use upcoach_auth::oidc::{DISCOVERY_RETRY, OpenIdConfig, OpenIdProvider};
use upcoach_auth::session::{AccessTokens, SigningKey};
use upcoach_auth::sessions::Sessions;
use upcoach_auth::{AuthProvider, AuthorizationRequest, Error, NativeCredential, ProviderId};
use upcoach_core::config::Settings;
use upcoach_core::event::ClientFacts;
use upcoach_core::{Secret, SystemClock};
use upcoach_testing::OidcProvider;

const CLIENT_ID: &str = "corp-web";
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";

fn corp() -> ProviderId {
    "corp".parse().unwrap()
}

fn redirect(name: ProviderId) -> String {
    format!("http://127.0.0.1:1/auth/{name}/callback")
}

/// `name` at `issuer` with the web client [`CLIENT_ID`].
fn config(name: ProviderId, issuer: &str) -> OpenIdConfig {
    OpenIdConfig::new(name, issuer, CLIENT_ID, Secret::new("corp-secret"))
}

fn provider(config: &OpenIdConfig) -> OpenIdProvider {
    OpenIdProvider::new(config, &redirect(config.name), Arc::new(SystemClock)).unwrap()
}

fn request(name: ProviderId) -> AuthorizationRequest {
    AuthorizationRequest {
        state: "state-1".into(),
        nonce: "nonce-1".into(),
        code_challenge: URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(VERIFIER)),
        redirect_uri: redirect(name),
    }
}

fn http() -> oauth2::reqwest::Client {
    oauth2::reqwest::Client::builder()
        .redirect(oauth2::reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn hint(claims: &Value) -> String {
    URL_SAFE_NO_PAD.encode(claims.to_string())
}

fn param(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The browser's part: follows `url` at the provider, signing in as `claims`, and
/// returns the code it redirects back with.
async fn code_at(mut url: url::Url, claims: &Value) -> String {
    url.query_pairs_mut()
        .append_pair("login_hint", &hint(claims));
    let answer = http().get(url.as_str()).send().await.unwrap();
    assert_eq!(answer.status(), 302, "{:?}", answer.text().await);
    let location = url::Url::parse(answer.headers()["location"].to_str().unwrap()).unwrap();
    param(&location, "code").expect("a code")
}

/// A code flow through `provider` as `claims`: authorization URL, the provider, the
/// code exchange.
async fn sign_in(
    provider: &OpenIdProvider,
    claims: &Value,
) -> Result<upcoach_auth::VerifiedIdentity, Error> {
    let request = request(provider.id());
    let url = provider.authorization_url(&request).await?;
    let code = code_at(url, claims).await;
    provider.exchange_code(&code, &request, VERIFIER).await
}

fn id_token(id_token: String, nonce: &str) -> NativeCredential {
    NativeCredential::IdToken {
        id_token,
        nonce: Some(nonce.to_owned()),
    }
}

/// Two independent providers, or `None` (skip) without Node.
async fn two_providers() -> Option<(OidcProvider, OidcProvider)> {
    Some((OidcProvider::start().await?, OidcProvider::start().await?))
}

#[tokio::test]
async fn a_provider_named_by_configuration_signs_in_through_the_code_flow() {
    let Some((a, b)) = two_providers().await else {
        return;
    };
    let gitlab: ProviderId = "gitlab".parse().unwrap();
    let corp_idp = provider(&config(corp(), a.issuer()));
    let gitlab_idp = provider(&config(gitlab, b.issuer()));
    assert_eq!(corp_idp.id(), corp());
    assert_eq!(corp_idp.issuer(), Some(a.issuer()));
    assert_eq!(corp_idp.redirect_uri(), redirect(corp()));

    let identity = sign_in(
        &corp_idp,
        &json!({"sub": "corp-7", "email": "ada@corp.example", "name": "Ada"}),
    )
    .await
    .unwrap();
    assert_eq!(identity.provider, corp());
    assert_eq!(identity.subject, "corp-7");
    assert_eq!(identity.email.as_deref(), Some("ada@corp.example"));
    assert!(
        identity.email_verified,
        "the mock's default is the boolean true"
    );
    assert_eq!(identity.name.as_deref(), Some("Ada"));
    assert!(identity.expires_at.is_some());

    // The second provider is a separate one with its own name, endpoints and keys.
    let identity = sign_in(&gitlab_idp, &json!({"sub": "gl-1"})).await.unwrap();
    assert_eq!(identity.provider, gitlab);
    assert_eq!(identity.subject, "gl-1");

    // Its browser went to its own authorization endpoint with our redirect URI.
    let url = gitlab_idp
        .authorization_url(&request(gitlab))
        .await
        .unwrap();
    assert!(url.as_str().starts_with(b.issuer()), "{url}");
    assert_eq!(
        param(&url, "redirect_uri").as_deref(),
        Some(redirect(gitlab).as_str())
    );
    assert_eq!(param(&url, "client_id").as_deref(), Some(CLIENT_ID));
    assert_eq!(
        param(&url, "code_challenge_method").as_deref(),
        Some("S256")
    );
    assert_eq!(param(&url, "nonce").as_deref(), Some("nonce-1"));
    assert_eq!(param(&url, "state").as_deref(), Some("state-1"));

    // A code of one provider means nothing at the other.
    let request = request(corp());
    let url = corp_idp.authorization_url(&request).await.unwrap();
    let code = code_at(url, &json!({})).await;
    let mut gitlab_request = request.clone();
    gitlab_request.redirect_uri = redirect(gitlab);
    let refused = gitlab_idp
        .exchange_code(&code, &gitlab_request, VERIFIER)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "authorization_code_rejected", "{refused:?}");
}

/// A local address where nothing listens (a port just released).
async fn dead_address() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A server that counts its connections and answers each request 503 after `delay`:
/// an issuer that is up but broken.
struct BrokenIssuer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl BrokenIssuer {
    async fn start(delay: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        Self {
            addr,
            connections,
            task,
        }
    }

    fn issuer(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for BrokenIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn new_fetches_nothing_and_a_failed_discovery_is_retried_only_after_a_while() {
    let broken = BrokenIssuer::start(Duration::ZERO).await;
    let corp_idp = provider(&config(corp(), &broken.issuer()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(broken.connections(), 0, "made without a request");

    let first = corp_idp
        .authorization_url(&request(corp()))
        .await
        .unwrap_err();
    assert_eq!(first.code(), "provider_unavailable");
    assert!(first.is_retryable());
    assert_eq!(broken.connections(), 1, "the first sign-in discovers");

    // Within DISCOVERY_RETRY every sign-in fails at once, without asking again.
    let started = Instant::now();
    for _ in 0..3 {
        let again = corp_idp
            .authorization_url(&request(corp()))
            .await
            .unwrap_err();
        assert_eq!(again.code(), "provider_unavailable");
        let native = corp_idp
            .verify_native(&id_token("x.y.z".into(), "n"))
            .await
            .unwrap_err();
        assert_eq!(native.code(), "provider_unavailable");
    }
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(broken.connections(), 1, "not asked again so soon");

    tokio::time::sleep(DISCOVERY_RETRY + Duration::from_millis(100)).await;
    let later = corp_idp
        .authorization_url(&request(corp()))
        .await
        .unwrap_err();
    assert_eq!(later.code(), "provider_unavailable");
    assert_eq!(broken.connections(), 2, "asked again after DISCOVERY_RETRY");
}

/// `node provider.mjs <port>`: the test provider on a port of our choosing, so an
/// issuer that was down can come up at its configured address. Killed when dropped.
struct ProviderAt {
    child: std::process::Child,
}

impl ProviderAt {
    fn start(port: u16) -> Self {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/js/oidc");
        let mut child = std::process::Command::new("node")
            .arg("provider.mjs")
            .arg(port.to_string())
            .current_dir(dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("node starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let announced: Value = serde_json::from_str(&line).expect("one JSON line");
        assert_eq!(announced["issuer"], format!("http://127.0.0.1:{port}"));
        Self { child }
    }
}

impl Drop for ProviderAt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_provider_that_was_down_at_first_works_once_it_is_up() {
    // Skips without Node, as the other tests do.
    let Some(_other) = OidcProvider::start().await else {
        return;
    };
    let addr = dead_address().await;
    let corp_idp = provider(&config(corp(), &format!("http://{addr}")));
    let down = corp_idp
        .authorization_url(&request(corp()))
        .await
        .unwrap_err();
    assert_eq!(down.code(), "provider_unavailable");
    let failed_at = Instant::now();

    let _up = tokio::task::spawn_blocking(move || ProviderAt::start(addr.port()))
        .await
        .unwrap();
    let still = corp_idp.authorization_url(&request(corp())).await;
    if failed_at.elapsed() < DISCOVERY_RETRY - Duration::from_millis(500) {
        assert_eq!(
            still.unwrap_err().code(),
            "provider_unavailable",
            "within DISCOVERY_RETRY of the failure"
        );
    }
    tokio::time::sleep(
        DISCOVERY_RETRY.saturating_sub(failed_at.elapsed()) + Duration::from_millis(100),
    )
    .await;
    let identity = sign_in(&corp_idp, &json!({"sub": "late-1"})).await.unwrap();
    assert_eq!(
        (identity.provider, identity.subject.as_str()),
        (corp(), "late-1")
    );
}

/// Sign-ins that arrive together while the provider is slow to fail share one
/// discovery: they must not each ask in turn (each waiting for those before it).
#[tokio::test]
async fn concurrent_sign_ins_share_one_failed_discovery() {
    let broken = BrokenIssuer::start(Duration::from_millis(500)).await;
    let corp_idp = Arc::new(provider(&config(corp(), &broken.issuer())));
    let started = Instant::now();
    let tries: Vec<_> = (0..4)
        .map(|_| {
            let corp_idp = corp_idp.clone();
            tokio::spawn(async move { corp_idp.authorization_url(&request(corp())).await })
        })
        .collect();
    for t in tries {
        let e = t.await.unwrap().unwrap_err();
        assert_eq!(e.code(), "provider_unavailable");
    }
    assert_eq!(
        broken.connections(),
        1,
        "each waiting sign-in ran discovery again after the one before it failed"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the sign-ins waited {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn discover_fails_at_once_for_a_dead_issuer_or_another_issuers_document() {
    let addr = dead_address().await;
    let started = Instant::now();
    let dead = OpenIdProvider::discover(
        &config(corp(), &format!("http://{addr}")),
        &redirect(corp()),
        Arc::new(SystemClock),
    )
    .await
    .unwrap_err();
    assert_eq!(dead.code(), "provider_unavailable");
    assert!(dead.is_retryable());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let Some(a) = OidcProvider::start().await else {
        return;
    };
    // The same server under another spelling of its address: its document names
    // http://127.0.0.1:<port>, not this issuer (OpenID Discovery §4.3).
    let port = url::Url::parse(a.issuer()).unwrap().port().unwrap();
    let other_spelling = format!("http://localhost:{port}");
    let mismatch = OpenIdProvider::discover(
        &config(corp(), &other_spelling),
        &redirect(corp()),
        Arc::new(SystemClock),
    )
    .await
    .unwrap_err();
    assert_eq!(mismatch.code(), "provider_unavailable");

    let found = OpenIdProvider::discover(
        &config(corp(), &format!("{}/", a.issuer())),
        &redirect(corp()),
        Arc::new(SystemClock),
    )
    .await
    .expect("a trailing slash on the issuer is the same issuer");
    assert!(found.id_tokens().await.is_ok());
}

#[tokio::test]
async fn the_configured_scopes_are_asked_for_with_openid_always_among_them() {
    let Some(a) = OidcProvider::start().await else {
        return;
    };
    let scope_of = async |config: OpenIdConfig| {
        let url = provider(&config)
            .authorization_url(&request(corp()))
            .await
            .unwrap();
        param(&url, "scope").expect("a scope parameter")
    };
    assert_eq!(
        scope_of(config(corp(), a.issuer())).await,
        "openid email profile",
        "the default"
    );
    assert_eq!(
        scope_of(config(corp(), a.issuer()).scopes(["email", "read_user"])).await,
        "openid email read_user"
    );
    assert_eq!(
        scope_of(config(corp(), a.issuer()).scopes(["profile", "openid", "groups"])).await,
        "profile openid groups",
        "openid once"
    );
    // The provider still signs in with the narrower set.
    let narrow = provider(&config(corp(), a.issuer()).scopes(["email"]));
    let identity = sign_in(&narrow, &json!({"sub": "scoped"})).await.unwrap();
    assert_eq!(identity.subject, "scoped");
}

#[tokio::test]
async fn one_providers_id_tokens_are_refused_by_another() {
    let Some((a, b)) = two_providers().await else {
        return;
    };
    let gitlab: ProviderId = "gitlab".parse().unwrap();
    // The same client id at both, so only the issuer and the keys tell them apart.
    let corp_idp = provider(&config(corp(), a.issuer()));
    let gitlab_idp = provider(&config(gitlab, b.issuer()));

    let from_a = a.id_token(CLIENT_ID, "n-a", &json!({"sub": "a-1"})).await;
    let refused = gitlab_idp
        .verify_native(&id_token(from_a.clone(), "n-a"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused.code(),
            "id_token_unknown_kid" | "id_token_bad_signature" | "id_token_wrong_issuer"
        ),
        "{refused:?}"
    );
    assert!(!refused.is_retryable(), "{refused:?}");
    let accepted = corp_idp
        .verify_native(&id_token(from_a, "n-a"))
        .await
        .unwrap();
    assert_eq!(
        (accepted.provider, accepted.subject.as_str()),
        (corp(), "a-1")
    );

    let from_b = b.id_token(CLIENT_ID, "n-b", &json!({"sub": "b-1"})).await;
    let refused = corp_idp
        .verify_native(&id_token(from_b.clone(), "n-b"))
        .await
        .unwrap_err();
    assert!(refused.code().starts_with("id_token_"), "{refused:?}");
    let accepted = gitlab_idp
        .verify_native(&id_token(from_b, "n-b"))
        .await
        .unwrap();
    assert_eq!(accepted.provider, gitlab);

    // Two names for the same issuer trust each other's tokens (same keys, same `iss`):
    // the issuer, not the name, is what an id token is bound to.
    let alias = provider(&config("corp-alias".parse().unwrap(), a.issuer()));
    let from_a = a.id_token(CLIENT_ID, "n-c", &json!({"sub": "a-2"})).await;
    let aliased = alias.verify_native(&id_token(from_a, "n-c")).await.unwrap();
    assert_eq!(aliased.provider.as_str(), "corp-alias");
}

#[tokio::test]
async fn native_id_tokens_for_another_of_our_clients_are_accepted_and_others_refused() {
    let Some(a) = OidcProvider::start().await else {
        return;
    };
    let with_app = provider(&config(corp(), a.issuer()).other_audiences(["corp-ios"]));
    let web_only = provider(&config(corp(), a.issuer()));

    let for_app = a
        .id_token("corp-ios", "n-1", &json!({"sub": "app-1"}))
        .await;
    let identity = with_app
        .verify_native(&id_token(for_app.clone(), "n-1"))
        .await
        .unwrap();
    assert_eq!(
        (identity.provider, identity.subject.as_str()),
        (corp(), "app-1")
    );
    let refused = web_only
        .verify_native(&id_token(for_app.clone(), "n-1"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "id_token_wrong_audience");

    let for_stranger = a
        .id_token("someone-else", "n-2", &json!({"sub": "app-2"}))
        .await;
    let refused = with_app
        .verify_native(&id_token(for_stranger, "n-2"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "id_token_wrong_audience");

    // The web client's own tokens, natively, too.
    let for_web = a.id_token(CLIENT_ID, "n-3", &json!({"sub": "web-1"})).await;
    assert!(
        with_app
            .verify_native(&id_token(for_web, "n-3"))
            .await
            .is_ok()
    );

    // The nonce must be the one the app sent, and must be sent.
    let wrong = with_app
        .verify_native(&id_token(for_app.clone(), "another"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), "id_token_nonce_mismatch");
    let missing = with_app
        .verify_native(&NativeCredential::IdToken {
            id_token: for_app,
            nonce: None,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), "nonce_required");
    let access_token = with_app
        .verify_native(&NativeCredential::AccessToken("opaque".into()))
        .await
        .unwrap_err();
    assert_eq!(access_token.code(), "id_token_required");
}

/// `OIDC_PROVIDERS` through [`AuthConfig`] into [`Sessions`]: each provider under its
/// name, nothing fetched (both issuers are down), unknown and unconfigured names told
/// apart.
#[tokio::test]
async fn configured_providers_are_added_by_name_without_fetching_anything() {
    let (corp_addr, idp_addr) = (dead_address().await, dead_address().await);
    let env = [
        ("OIDC_PROVIDERS", "corp, my-idp".to_owned()),
        ("OIDC_CORP_ISSUER", format!("http://{corp_addr}")),
        ("OIDC_CORP_CLIENT_ID", "corp-web".to_owned()),
        ("OIDC_CORP_CLIENT_SECRET", "s1".to_owned()),
        ("OIDC_CORP_TRUSTED_FOR_LINKING", "true".to_owned()),
        ("OIDC_MY_IDP_ISSUER", format!("http://{idp_addr}")),
        ("OIDC_MY_IDP_CLIENT_ID", "idp-web".to_owned()),
        ("OIDC_MY_IDP_CLIENT_SECRET", "s2".to_owned()),
    ];
    let config =
        AuthConfig::from_lookup(|n| env.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone()))
            .unwrap();
    assert_eq!(config.openid.len(), 2);
    assert!(config.openid[0].trusted_for_linking && !config.openid[1].trusted_for_linking);

    let tokens = AccessTokens::new(SigningKey::generate().unwrap(), Arc::new(SystemClock));
    let started = Instant::now();
    let sessions = Sessions::builder(Arc::new(tokens), "http://127.0.0.1:1")
        .configure(&config)
        .await
        .expect("configured while both issuers are down")
        .build();
    assert!(started.elapsed() < Duration::from_secs(1));
    let mut names: Vec<String> = sessions.providers().map(|p| p.to_string()).collect();
    names.sort();
    assert_eq!(names, ["corp", "my-idp"]);
    assert_eq!(
        sessions.callback_url("my-idp".parse().unwrap()),
        "http://127.0.0.1:1/auth/my-idp/callback"
    );

    let facts = ClientFacts::default();
    let code = async |name: &str| {
        sessions
            .authorize(name, None, None, None, &facts)
            .await
            .map(|_| ())
            .unwrap_err()
            .code()
    };
    assert_eq!(code("corp").await, "provider_unavailable");
    assert_eq!(code("my-idp").await, "provider_unavailable");
    assert_eq!(code("gitlab").await, "unknown_provider");
    assert_eq!(code("Corp").await, "unknown_provider");
    assert_eq!(code("google").await, "provider_not_configured");
}

/// Providers added by hand ([`SessionsBuilder::provider`](upcoach_auth::sessions::SessionsBuilder::provider)),
/// their linking trust said in the [`LinkingPolicy`], as docs/openid-providers.md shows.
#[tokio::test]
async fn providers_added_by_hand_link_as_the_linking_policy_says() {
    use upcoach_auth::users::LinkingPolicy;
    let Some((a, b)) = two_providers().await else {
        return;
    };
    let gitlab: ProviderId = "gitlab".parse().unwrap();
    let public_url = "https://api.example.com";
    let sessions = |trusted: bool| {
        let corp_config = config(corp(), a.issuer()).other_audiences(["corp-ios"]);
        let gitlab_config = config(gitlab, b.issuer());
        let clock = Arc::new(SystemClock);
        let corp_idp = OpenIdProvider::new(
            &corp_config,
            &Sessions::callback_url_of(public_url, corp()),
            clock.clone(),
        )
        .unwrap();
        let gitlab_idp = OpenIdProvider::new(
            &gitlab_config,
            &Sessions::callback_url_of(public_url, gitlab),
            clock.clone(),
        )
        .unwrap();
        let tokens = AccessTokens::new(SigningKey::generate().unwrap(), clock);
        Sessions::builder(Arc::new(tokens), public_url)
            .provider(Arc::new(corp_idp))
            .provider(Arc::new(gitlab_idp))
            // GitLab's word counts for the user it makes (an untrusted provider's
            // "verified" makes no verified holder); corp links only when trusted.
            .linking(
                LinkingPolicy::default()
                    .with(gitlab, true)
                    .with(corp(), trusted),
            )
            .build()
    };
    let facts = ClientFacts::default();
    let ada = |sub: &str| json!({"sub": sub, "email": "ada@example.test", "email_verified": true});

    for trusted in [true, false] {
        let sessions = sessions(trusted);
        let token = b.id_token(CLIENT_ID, "n-gl", &ada("gl-ada")).await;
        let first = sessions
            .sign_in_with_token("gitlab", id_token(token, "n-gl"), None, None, &facts)
            .await
            .unwrap();
        assert_eq!(first.user.providers, [gitlab]);
        let token = a.id_token("corp-ios", "n-corp", &ada("corp-ada")).await;
        let second = sessions
            .sign_in_with_token("corp", id_token(token, "n-corp"), None, None, &facts)
            .await;
        if trusted {
            let second = second.unwrap();
            assert_eq!(
                second.user.id, first.user.id,
                "linked by the verified address"
            );
            assert_eq!(second.user.providers, [gitlab, corp()]);
        } else {
            assert_eq!(second.map(|_| ()).unwrap_err().code(), "account_exists");
        }
    }
}

/// A provider that refuses our client credentials (`invalid_client`,
/// `unauthorized_client`: a wrong secret or client id) is `provider_misconfigured`,
/// which a retry does not fix (500, not 503); a refused code stays
/// `authorization_code_rejected`, and anything else the token endpoint says
/// `provider_unavailable`.
#[tokio::test]
async fn refused_client_credentials_are_a_misconfiguration_not_an_outage() {
    let Some(idp) = OidcProvider::start().await else {
        return;
    };
    let corp_idp = provider(&config(corp(), idp.issuer()));
    for (error, code, retryable) in [
        ("invalid_client", "provider_misconfigured", false),
        ("unauthorized_client", "provider_misconfigured", false),
        ("invalid_grant", "authorization_code_rejected", false),
        ("temporarily_unavailable", "provider_unavailable", true),
    ] {
        let refused = sign_in(&corp_idp, &json!({ "token_error": error }))
            .await
            .unwrap_err();
        assert_eq!(
            (refused.code(), refused.is_retryable()),
            (code, retryable),
            "{error}: {refused:?}"
        );
    }
    // The stand-in answers the next sign-in as usual.
    sign_in(&corp_idp, &json!({})).await.unwrap();
}

/// A provider whose issuer ends in `/` (discovery, the tokens and RFC 9207's `iss` say
/// `http://127.0.0.1:<port>/`): the flow expects the issuer exactly as discovery names
/// it, so its callback's `iss` passes and the same issuer without the `/` does not.
#[tokio::test]
async fn an_issuer_ending_in_a_slash_is_compared_as_discovery_names_it() {
    use upcoach_auth::flow::MemoryFlowStore;
    use upcoach_auth::web::{CallbackParams, WebSignIn};
    let Some(idp) = OidcProvider::start_with_trailing_slash().await else {
        return;
    };
    assert!(idp.issuer().ends_with('/'), "{}", idp.issuer());
    let corp_idp = provider(&config(corp(), idp.issuer()));
    let web = WebSignIn::new(Arc::new(MemoryFlowStore::new()), Vec::new());
    let without_slash = idp.issuer().trim_end_matches('/').to_owned();
    for (iss, accepted) in [
        (Some(idp.issuer().to_owned()), true),
        (None, true),
        (Some(without_slash), false),
    ] {
        let started = web
            .begin(&corp_idp, &redirect(corp()), None, Some("web"), None, None)
            .await
            .unwrap();
        assert_eq!(corp_idp.issuer(), Some(idp.issuer()), "as discovered");
        let code = code_at(started.redirect.clone(), &json!({"sub": "slash-1"})).await;
        let params = CallbackParams {
            state: param(&started.redirect, "state"),
            code: Some(code),
            iss: iss.clone(),
            ..CallbackParams::default()
        };
        let outcome = web
            .complete(&corp_idp, &params, Some(&started.browser_cookie))
            .await;
        match (accepted, outcome) {
            (true, Ok(completed)) => assert_eq!(completed.identity.subject, "slash-1"),
            (false, Err(e)) => assert_eq!(e.code(), "flow_issuer_mismatch", "{iss:?}"),
            (_, outcome) => panic!("{iss:?}: {outcome:?}"),
        }
    }
}

/// A provider added by hand carries its own `trusted_for_linking`, as `configure` reads
/// it from the environment; a policy the host gives (`linking`) is exactly what links,
/// before or after the providers are added.
#[tokio::test]
async fn a_providers_own_linking_trust_applies_unless_the_host_sets_a_policy() {
    use upcoach_auth::sessions::SessionsBuilder;
    use upcoach_auth::users::LinkingPolicy;
    let Some((a, b)) = two_providers().await else {
        return;
    };
    let gitlab: ProviderId = "gitlab".parse().unwrap();
    let public_url = "https://api.example.com";
    let clock = Arc::new(SystemClock);
    let with_providers = |builder: SessionsBuilder| {
        let corp_config = config(corp(), a.issuer())
            .other_audiences(["corp-ios"])
            .trusted_for_linking(true);
        // Trusted too, so the user GitLab makes holds the address verified.
        let gitlab_config = config(gitlab, b.issuer()).trusted_for_linking(true);
        let add = |config: &OpenIdConfig| {
            Arc::new(
                OpenIdProvider::new(
                    config,
                    &Sessions::callback_url_of(public_url, config.name),
                    clock.clone(),
                )
                .unwrap(),
            )
        };
        builder
            .provider(add(&corp_config))
            .provider(add(&gitlab_config))
    };
    let builder = || {
        let tokens = AccessTokens::new(SigningKey::generate().unwrap(), clock.clone());
        Sessions::builder(Arc::new(tokens), public_url)
    };
    let cases = [
        (
            "the provider's own trust",
            with_providers(builder()).build(),
            true,
        ),
        (
            "a policy given after",
            with_providers(builder())
                .linking(LinkingPolicy::default())
                .build(),
            false,
        ),
        (
            "a policy given before",
            with_providers(builder().linking(LinkingPolicy::default())).build(),
            false,
        ),
    ];
    let facts = ClientFacts::default();
    let ada = |sub: &str| json!({"sub": sub, "email": "ada@example.test", "email_verified": true});
    for (i, (case, sessions, links)) in cases.into_iter().enumerate() {
        let nonce = |p: &str| format!("n-{p}-{i}");
        let token = b.id_token(CLIENT_ID, &nonce("gl"), &ada("gl-ada")).await;
        let first = sessions
            .sign_in_with_token("gitlab", id_token(token, &nonce("gl")), None, None, &facts)
            .await
            .unwrap();
        let token = a
            .id_token("corp-ios", &nonce("corp"), &ada("corp-ada"))
            .await;
        let second = sessions
            .sign_in_with_token("corp", id_token(token, &nonce("corp")), None, None, &facts)
            .await;
        match (links, second) {
            (true, Ok(second)) => assert_eq!(second.user.id, first.user.id, "{case}"),
            (false, Err(e)) => assert_eq!(e.code(), "account_exists", "{case}"),
            (_, other) => panic!("{case}: {:?}", other.map(|t| t.user)),
        }
    }
}
