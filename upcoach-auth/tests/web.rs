//! The browser flow's own checks, with two scripted providers: a callback for another
//! provider's flow (mix-up), a flow from another browser, and one-time login codes; the
//! device a browser session is bound to, and the device cookie that carries it through
//! the routes; and the quota on started sign-ins (a flood from one address, from many,
//! a limiter outage; in memory and on Redis).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use upcoach_auth::flow::MemoryFlowStore;
use upcoach_auth::web::{BrowserBinding, LoginProof};
use upcoach_auth::web::{CallbackParams, LoginGrant, WebSignIn};
use upcoach_auth::{
    AuthProvider, AuthorizationRequest, Error, NativeCredential, ProviderId, VerifiedIdentity,
};
use upcoach_core::{SessionId, UserId};

/// A provider that accepts any code and counts exchanges.
#[derive(Debug)]
struct Scripted {
    id: ProviderId,
    issuer: &'static str,
    exchanges: AtomicUsize,
}

#[async_trait]
impl AuthProvider for Scripted {
    fn id(&self) -> ProviderId {
        self.id
    }

    fn issuer(&self) -> Option<&str> {
        Some(self.issuer)
    }

    async fn authorization_url(&self, request: &AuthorizationRequest) -> Result<url::Url, Error> {
        let mut url = url::Url::parse("https://provider.example.test/authorize").unwrap();
        url.query_pairs_mut()
            .append_pair("state", &request.state)
            .append_pair("code_challenge", &request.code_challenge);
        Ok(url)
    }

    async fn exchange_code(
        &self,
        _code: &str,
        request: &AuthorizationRequest,
        verifier: &str,
    ) -> Result<VerifiedIdentity, Error> {
        use base64::Engine;
        use sha2::Digest;
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(verifier.as_bytes()));
        assert_eq!(
            challenge, request.code_challenge,
            "the verifier matches the challenge sent"
        );
        self.exchanges.fetch_add(1, Ordering::SeqCst);
        Ok(VerifiedIdentity {
            provider: self.id,
            subject: "s-1".into(),
            email: None,
            email_verified: false,
            name: None,
            expires_at: None,
        })
    }

    async fn verify_native(&self, _: &NativeCredential) -> Result<VerifiedIdentity, Error> {
        Err(Error::InvalidCredential {
            reason: "not scripted",
        })
    }
}

fn provider(id: ProviderId) -> Scripted {
    Scripted {
        id,
        issuer: "https://provider.example.test",
        exchanges: AtomicUsize::new(0),
    }
}

fn setup() -> WebSignIn {
    WebSignIn::new(
        Arc::new(MemoryFlowStore::new()),
        vec!["https://app.example.test/in".into()],
    )
}

/// A flow of `provider` with no `return_to`, platform, challenge or device, called
/// back at `https://api.example.test/cb`.
async fn begin(web: &WebSignIn, provider: &Scripted) -> upcoach_auth::web::Started {
    web.begin(
        provider,
        "https://api.example.test/cb",
        None,
        None,
        None,
        None,
    )
    .await
    .unwrap()
}

fn state_of(url: &url::Url) -> String {
    url.query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned()
}

#[tokio::test]
async fn a_callback_for_another_providers_flow_is_refused() {
    let web = setup();
    let google = provider(ProviderId::GOOGLE);
    let apple = provider(ProviderId::APPLE);
    let started = web
        .begin(
            &google,
            "https://api.example.test/auth/google/callback",
            None,
            None,
            None,
            None,
        )
        .await
        .unwrap();
    let params = CallbackParams {
        state: Some(state_of(&started.redirect)),
        code: Some("code-from-the-other-provider".into()),
        error: None,
        iss: None,
        user: None,
    };
    let e = web
        .complete(&apple, &params, Some(&started.browser_cookie))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "flow_provider_mismatch");
    assert_eq!(
        apple.exchanges.load(Ordering::SeqCst),
        0,
        "no code was sent anywhere"
    );
    let again = web
        .complete(&google, &params, Some(&started.browser_cookie))
        .await
        .unwrap_err();
    assert_eq!(
        again.code(),
        "state_invalid",
        "the flow was used up by the refused attempt"
    );
}

#[tokio::test]
async fn the_flow_belongs_to_the_browser_that_started_it() {
    let web = setup();
    let google = provider(ProviderId::GOOGLE);
    for cookie in [None, Some("another-browser")] {
        let started = begin(&web, &google).await;
        let params = CallbackParams {
            state: Some(state_of(&started.redirect)),
            code: Some("c".into()),
            error: None,
            iss: None,
            user: None,
        };
        let e = web.complete(&google, &params, cookie).await.unwrap_err();
        assert_eq!(e.code(), "flow_browser_mismatch", "{cookie:?}");
    }
    let started = web
        .begin(
            &google,
            "https://api.example.test/cb",
            Some("https://app.example.test/in"),
            Some("web"),
            None,
            None,
        )
        .await
        .unwrap();
    let params = CallbackParams {
        state: Some(state_of(&started.redirect)),
        code: Some("c".into()),
        error: None,
        iss: None,
        user: None,
    };
    let done = web
        .complete(&google, &params, Some(&started.browser_cookie))
        .await
        .unwrap();
    assert_eq!(
        done.return_to.as_deref(),
        Some("https://app.example.test/in")
    );
    assert_eq!(google.exchanges.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_provider_error_and_a_missing_code_are_refused() {
    let web = setup();
    let google = provider(ProviderId::GOOGLE);
    let started = begin(&web, &google).await;
    let denied = CallbackParams {
        state: Some(state_of(&started.redirect)),
        code: None,
        error: Some("access_denied".into()),
        iss: None,
        user: None,
    };
    assert_eq!(
        web.complete(&google, &denied, Some(&started.browser_cookie))
            .await
            .unwrap_err()
            .code(),
        "provider_denied"
    );
    let started = begin(&web, &google).await;
    let no_code = CallbackParams {
        state: Some(state_of(&started.redirect)),
        code: None,
        error: None,
        iss: None,
        user: None,
    };
    assert_eq!(
        web.complete(&google, &no_code, Some(&started.browser_cookie))
            .await
            .unwrap_err()
            .code(),
        "code_missing"
    );
}

#[tokio::test]
async fn login_codes_work_once() {
    let web = setup();
    let grant = LoginGrant {
        user_id: UserId::new(),
        provider: ProviderId::GOOGLE,
        session_id: SessionId::new(),
        binding: BrowserBinding::new("the-browser", None),
    };
    let proof = LoginProof {
        browser_cookie: Some("the-browser"),
        login_verifier: None,
    };
    let code = web.issue_login_code(&grant).await.unwrap();
    assert_eq!(web.redeem_login_code(&code, &proof).await.unwrap(), grant);
    assert_eq!(
        web.redeem_login_code(&code, &proof)
            .await
            .unwrap_err()
            .code(),
        "login_code_invalid"
    );
    assert_eq!(
        web.redeem_login_code("guessed", &proof)
            .await
            .unwrap_err()
            .code(),
        "login_code_invalid"
    );
}

/// Login CSRF: a code issued to one browser, redeemed by another (no cookie, another
/// cookie, a wrong verifier), is refused and used up.
#[tokio::test]
async fn login_codes_only_work_in_the_browser_that_began() {
    let web = setup();
    let verifier = "a-verifier-the-web-app-chose-and-kept-to-itself";
    let grant = LoginGrant {
        user_id: UserId::new(),
        provider: ProviderId::GOOGLE,
        session_id: SessionId::new(),
        binding: BrowserBinding::new(
            "victim-cookie",
            Some(&BrowserBinding::challenge_of(verifier)),
        ),
    };
    for (cookie, login_verifier) in [
        (None, None),
        (Some("attacker-cookie"), None),
        (None, Some("a-guessed-verifier")),
        (Some("attacker-cookie"), Some("a-guessed-verifier")),
    ] {
        let code = web.issue_login_code(&grant).await.unwrap();
        let proof = LoginProof {
            browser_cookie: cookie,
            login_verifier,
        };
        assert_eq!(
            web.redeem_login_code(&code, &proof)
                .await
                .unwrap_err()
                .code(),
            "login_code_browser_mismatch",
            "{proof:?}"
        );
        let right = LoginProof {
            browser_cookie: Some("victim-cookie"),
            login_verifier: None,
        };
        assert_eq!(
            web.redeem_login_code(&code, &right)
                .await
                .unwrap_err()
                .code(),
            "login_code_invalid",
            "a refused code is used up"
        );
    }
    // The app chose a verifier: only the verifier redeems, the cookie alone does not
    // (a cookie can be tossed in by a sibling subdomain).
    let code = web.issue_login_code(&grant).await.unwrap();
    let cookie_only = LoginProof {
        browser_cookie: Some("victim-cookie"),
        login_verifier: None,
    };
    assert_eq!(
        web.redeem_login_code(&code, &cookie_only)
            .await
            .unwrap_err()
            .code(),
        "login_code_browser_mismatch"
    );
    let code = web.issue_login_code(&grant).await.unwrap();
    let with_verifier = LoginProof {
        browser_cookie: None,
        login_verifier: Some(verifier),
    };
    assert_eq!(
        web.redeem_login_code(&code, &with_verifier).await.unwrap(),
        grant
    );
    // Without a challenge, the browser's cookie redeems.
    let by_cookie = LoginGrant {
        binding: BrowserBinding::new("victim-cookie", None),
        ..grant
    };
    let code = web.issue_login_code(&by_cookie).await.unwrap();
    assert_eq!(
        web.redeem_login_code(&code, &cookie_only).await.unwrap(),
        by_cookie
    );
}

#[tokio::test]
async fn a_callback_naming_another_issuer_is_refused() {
    let web = setup();
    let google = provider(ProviderId::GOOGLE);
    let started = begin(&web, &google).await;
    let params = CallbackParams {
        state: Some(state_of(&started.redirect)),
        code: Some("c".into()),
        error: None,
        iss: Some("https://attacker.example.test".into()),
        user: None,
    };
    let e = web
        .complete(&google, &params, Some(&started.browser_cookie))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "flow_issuer_mismatch");
    assert_eq!(google.exchanges.load(Ordering::SeqCst), 0);
    let started = begin(&web, &google).await;
    let params = CallbackParams {
        state: Some(state_of(&started.redirect)),
        code: Some("c".into()),
        error: None,
        iss: Some("https://provider.example.test".into()),
        user: None,
    };
    assert!(
        web.complete(&google, &params, Some(&started.browser_cookie))
            .await
            .is_ok(),
        "its own issuer passes"
    );
}

// ---- Sessions over the scripted provider: devices and the flow quota ----

use std::net::IpAddr;
use std::time::Duration;

use upcoach_auth::http::AuthRoutes;
use upcoach_auth::refresh::DeviceId;
use upcoach_auth::session::{AccessTokens, SigningKey};
use upcoach_auth::sessions::{AuthError, CallbackOutcome, Sessions, SessionsBuilder};
use upcoach_core::event::ClientFacts;
use upcoach_core::limit::{Decision, LimitError, LimitFuture, MemoryLimiter, Quota, RateLimiter};

const RETURN_TO: &str = "https://app.example.test/in";

fn builder() -> SessionsBuilder {
    let tokens = Arc::new(AccessTokens::new(
        SigningKey::generate().unwrap(),
        Arc::new(upcoach_core::SystemClock),
    ));
    Sessions::builder(tokens, "https://api.example.test")
        .provider(Arc::new(provider(ProviderId::GOOGLE)))
        .return_to_allowlist(vec![RETURN_TO.into()])
}

fn from(ip: &str) -> ClientFacts {
    ClientFacts {
        ip: Some(ip.parse::<IpAddr>().unwrap()),
        user_agent: Some("Mozilla/5.0".into()),
        platform: Some("web".into()),
    }
}

/// A browser signing in: authorize, the provider's callback, and (with `return_to`)
/// the login code the web app exchanges, presenting `device` (at the callback or the
/// exchange, whichever answers with tokens) if given.
async fn browser_sign_in(
    sessions: &Sessions,
    return_to: Option<&str>,
    device: Option<&DeviceId>,
) -> upcoach_auth::sessions::TokenResponse {
    let facts = from("203.0.113.10");
    let started = sessions
        .authorize("google", return_to, None, None, &facts)
        .await
        .unwrap();
    let params = CallbackParams {
        state: Some(state_of(&started.redirect)),
        code: Some("c".into()),
        error: None,
        iss: None,
        user: None,
    };
    let cookie = Some(started.browser_cookie.as_str());
    match sessions
        .callback("google", &params, cookie, device, &facts)
        .await
    {
        Ok(CallbackOutcome::SignedIn(tokens)) => tokens,
        Ok(CallbackOutcome::Redirect(url)) => {
            let code = url
                .query_pairs()
                .find(|(k, _)| k == "login_code")
                .unwrap()
                .1
                .into_owned();
            let proof = LoginProof {
                browser_cookie: cookie,
                login_verifier: None,
            };
            sessions
                .exchange(&code, &proof, device, &facts)
                .await
                .unwrap()
        }
        Err(e) => panic!("callback: {e:?}"),
    }
}

/// A browser's session is bound to the device it presents (its device cookie, or the
/// web app's own id), or to a device id made by the server, which only then the answer
/// carries; every refresh must present it again, and no answer repeats it.
#[tokio::test]
async fn a_browser_session_is_bound_to_its_device() {
    let sessions = builder().build();
    let facts = from("203.0.113.10");
    for return_to in [Some(RETURN_TO), None] {
        let tokens = browser_sign_in(&sessions, return_to, None).await;
        let device = DeviceId::parse(tokens.device_id.as_deref().expect("a device id"))
            .expect("a valid device id");
        assert_eq!(device.expose().len(), 43, "256 random bits");
        let rotated = sessions
            .refresh(&tokens.refresh_token, Some(&device), &facts)
            .await
            .unwrap();
        assert_eq!(rotated.device_id, None, "the client knows it already");
        let refused = sessions
            .refresh(&rotated.refresh_token, None, &facts)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), "device_mismatch", "{return_to:?}");
    }
    let another = browser_sign_in(&sessions, Some(RETURN_TO), None).await;
    let first = browser_sign_in(&sessions, Some(RETURN_TO), None).await;
    assert_ne!(another.device_id, first.device_id, "a new id each time");

    // A device presented (the browser's cookie, the web app's own id), at the exchange
    // or at a callback that answers with tokens: bound to it, and not answered back.
    let own = DeviceId::parse("web-app:device-0001").unwrap();
    for return_to in [Some(RETURN_TO), None] {
        let tokens = browser_sign_in(&sessions, return_to, Some(&own)).await;
        assert_eq!(tokens.device_id, None, "{return_to:?}");
        let other = DeviceId::parse("web-app:device-0002").unwrap();
        let rotated = sessions
            .refresh(&tokens.refresh_token, Some(&own), &facts)
            .await
            .unwrap();
        let refused = sessions
            .refresh(&rotated.refresh_token, Some(&other), &facts)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), "device_mismatch", "{return_to:?}");
    }
}

/// Counts exactly: `limit` per (rule, subject), never refilled; or always fails.
#[derive(Debug, Default)]
struct Counting {
    seen: std::sync::Mutex<std::collections::HashMap<(String, String), u32>>,
    down: bool,
}

#[async_trait]
impl RateLimiter for Counting {
    fn check<'a>(&'a self, rule: &'a str, subject: &'a str, quota: Quota) -> LimitFuture<'a> {
        if self.down {
            return LimitFuture::ready(Err(LimitError::Unavailable(
                "the limiter's Redis is down".into(),
            )));
        }
        let mut seen = self.seen.lock().unwrap();
        let count = seen.entry((rule.into(), subject.into())).or_default();
        let allowed = *count < quota.limit();
        if allowed {
            *count += 1;
        }
        LimitFuture::ready(Ok(Decision {
            allowed,
            limit: quota.limit(),
            remaining: quota.limit() - *count,
            reset_after: quota.window(),
            retry_after: if allowed {
                Duration::ZERO
            } else {
                quota.emission_interval()
            },
        }))
    }

    async fn block(&self, _: &str, _: Duration) -> Result<(), LimitError> {
        Ok(())
    }
}

impl Counting {
    fn subjects(&self, rule: &str) -> Vec<(String, u32)> {
        let mut subjects: Vec<_> = self
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|((r, _), _)| r == rule)
            .map(|((_, s), n)| (s.clone(), *n))
            .collect();
        subjects.sort();
        subjects
    }
}

/// `n` sign-ins started from `facts`: how many were admitted before the first refusal,
/// and that refusal.
async fn flood(sessions: &Sessions, facts: &ClientFacts, n: usize) -> (usize, Option<AuthError>) {
    for i in 0..n {
        if let Err(e) = sessions
            .authorize("google", Some(RETURN_TO), None, None, facts)
            .await
        {
            return (i, Some(e));
        }
    }
    (n, None)
}

/// The flood that filled the flow store: anonymous sign-ins from one address. With the
/// default quota, the 31st in ten minutes is refused (429) and stores nothing; another
/// address still signs in.
#[tokio::test]
async fn a_flood_of_sign_ins_from_one_address_stops_at_its_quota() {
    let flows = Arc::new(MemoryFlowStore::new());
    let sessions = builder().flow_store(flows.clone()).build();
    let (admitted, refused) = flood(&sessions, &from("203.0.113.7"), 200).await;
    assert_eq!(admitted, 30, "the default quota: 30 per ten minutes");
    let refused = refused.expect("refused");
    assert_eq!(refused.code(), "too_many_sign_in_flows");
    assert!(refused.is_retryable());
    let wait = refused.retry_after().expect("a retry-after");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(20),
        "the next one comes back within the emission interval: {wait:?}"
    );
    for _ in 0..50 {
        sessions
            .authorize("google", Some(RETURN_TO), None, None, &from("203.0.113.7"))
            .await
            .unwrap_err();
    }
    assert_eq!(flows.len(), 30, "refused sign-ins store nothing");

    // Another address, and another IPv6 /64, start theirs.
    for ip in ["198.51.100.4", "2001:db8:1:2::1", "2001:db8:1:3::1"] {
        sessions
            .authorize("google", Some(RETURN_TO), None, None, &from(ip))
            .await
            .unwrap_or_else(|e| panic!("{ip}: {e:?}"));
    }
    // The same /64 is one subject.
    let (admitted, _) = flood(&sessions, &from("2001:db8:1:2::ffff"), 100).await;
    assert_eq!(admitted, 29);
}

/// Requests whose address is unknown share one budget; refused requests (bad
/// `return_to`, bad challenge) do not count against anyone.
#[tokio::test]
async fn unknown_addresses_share_a_budget_and_bad_requests_do_not_count() {
    let limiter = Arc::new(Counting::default());
    let quota = Quota::new(3, Duration::from_secs(600)).unwrap();
    let sessions = builder().flow_quota(limiter.clone(), quota).build();
    let unknown = ClientFacts::default();
    for _ in 0..10 {
        let bad = sessions
            .authorize(
                "google",
                Some("https://evil.example.test/"),
                None,
                None,
                &unknown,
            )
            .await
            .unwrap_err();
        assert_eq!(bad.code(), "return_to_not_allowed");
        let bad = sessions
            .authorize("google", None, Some("short"), None, &unknown)
            .await
            .unwrap_err();
        assert_eq!(bad.code(), "login_challenge_invalid");
    }
    assert!(limiter.subjects("auth.flows").is_empty(), "nothing counted");
    let (admitted, refused) = flood(&sessions, &unknown, 10).await;
    assert_eq!(admitted, 3);
    assert_eq!(refused.unwrap().code(), "too_many_sign_in_flows");
    assert_eq!(
        limiter.subjects("auth.flows"),
        [("ip:unknown".to_owned(), 3)]
    );
    let (admitted, _) = flood(&sessions, &from("203.0.113.7"), 1).await;
    assert_eq!(admitted, 1, "another address has its own budget");
    assert_eq!(
        limiter.subjects("auth.flows.total"),
        [("all".to_owned(), 4)],
        "admitted sign-ins count in the total"
    );
}

/// Many addresses together stop at the total (503 `sign_in_busy`), which bounds the
/// stored flows whatever the number of addresses.
#[tokio::test]
async fn many_addresses_stop_at_the_total() {
    let limiter = Arc::new(Counting::default());
    let per_address = Quota::new(30, Duration::from_secs(600)).unwrap();
    let sessions = builder()
        .flow_quota(limiter.clone(), per_address)
        .flow_total_quota(Quota::new(50, Duration::from_secs(600)))
        .build();
    let mut admitted = 0;
    let mut refusal = None;
    for i in 0..200u32 {
        let facts = from(&format!("2001:db8:{i:x}::1"));
        match sessions
            .authorize("google", Some(RETURN_TO), None, None, &facts)
            .await
        {
            Ok(_) => admitted += 1,
            Err(e) => {
                refusal = Some(e);
                break;
            }
        }
    }
    assert_eq!(admitted, 50);
    let refusal = refusal.unwrap();
    assert_eq!(refusal.code(), "sign_in_busy");
    assert!(refusal.retry_after().is_some());

    // Off: only the per-address quota is left.
    let sessions = builder()
        .flow_quota(Arc::new(Counting::default()), per_address)
        .flow_total_quota(None)
        .build();
    for i in 0..100u32 {
        let facts = from(&format!("2001:db8:{i:x}::1"));
        sessions
            .authorize("google", Some(RETURN_TO), None, None, &facts)
            .await
            .unwrap();
    }
}

async fn answer(response: upcoach_auth::http::Answer) -> (http::HeaderMap, u16, serde_json::Value) {
    let (parts, body) = response.into_parts();
    let bytes = http_body_util::BodyExt::collect(body)
        .await
        .unwrap()
        .to_bytes();
    (
        parts.headers,
        parts.status.as_u16(),
        serde_json::from_slice(&bytes).unwrap_or_default(),
    )
}

fn authorize_from(ip: &str) -> http::Request<()> {
    let mut request = http::Request::get(format!(
        "/auth/google/authorize?platform=web&return_to={}",
        url::form_urlencoded::byte_serialize(RETURN_TO.as_bytes()).collect::<String>()
    ))
    .body(())
    .unwrap();
    request
        .extensions_mut()
        .insert(upcoach_core::http::ClientAddr(
            format!("{ip}:50000").parse().unwrap(),
        ));
    request
}

/// Over HTTP: 429 with `Retry-After` and the rate-limit headers; 503 `sign_in_busy`
/// likewise; a limiter that cannot answer fails closed (503, `Retry-After: 1`).
#[tokio::test]
async fn the_routes_answer_429_and_503_with_retry_after() {
    let limiter = Arc::new(Counting::default());
    let routes = AuthRoutes::new(Arc::new(
        builder()
            .flow_quota(limiter, Quota::new(2, Duration::from_secs(600)).unwrap())
            .flow_total_quota(Quota::new(3, Duration::from_secs(600)))
            .build(),
    ));
    for _ in 0..2 {
        let (_, status, _) = answer(
            routes
                .authorize("google", authorize_from("203.0.113.7"))
                .await,
        )
        .await;
        assert_eq!(status, 302);
    }
    let (headers, status, body) = answer(
        routes
            .authorize("google", authorize_from("203.0.113.7"))
            .await,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("too_many_sign_in_flows"))
    );
    assert_eq!(headers["retry-after"], "300");
    assert_eq!(headers["ratelimit-policy"], "\"auth.flows\";q=2;w=600");
    assert_eq!(headers["ratelimit"], "\"auth.flows\";r=0;t=600");
    assert!(headers.get("set-cookie").is_none(), "no flow, no cookie");

    let (_, status, _) = answer(
        routes
            .authorize("google", authorize_from("198.51.100.4"))
            .await,
    )
    .await;
    assert_eq!(status, 302, "another address");
    let (headers, status, body) = answer(
        routes
            .authorize("google", authorize_from("198.51.100.5"))
            .await,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("sign_in_busy"))
    );
    assert_eq!(headers["retry-after"], "200");
    assert_eq!(
        headers["ratelimit-policy"],
        "\"auth.flows.total\";q=3;w=600"
    );

    let flows = Arc::new(MemoryFlowStore::new());
    let down = AuthRoutes::new(Arc::new(
        builder()
            .flow_store(flows.clone())
            .flow_quota(
                Arc::new(Counting {
                    down: true,
                    ..Counting::default()
                }),
                Quota::new(2, Duration::from_secs(600)).unwrap(),
            )
            .build(),
    ));
    let (headers, status, body) = answer(
        down.authorize("google", authorize_from("203.0.113.7"))
            .await,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("rate_limiter_unavailable"))
    );
    assert_eq!(headers["retry-after"], "1");
    assert!(
        !body.to_string().contains("Redis"),
        "no internal detail: {body}"
    );
    assert!(flows.is_empty(), "fails closed: nothing stored");
}

/// The flood on Redis, as a deployment runs it: two processes whose services take
/// Redis ([`SessionsBuilder::redis`]) for their flows and their flow quota. One address
/// stores its 30 flows and no more, whichever process it reaches; another address
/// still signs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_redis_stores_no_more_than_the_quota() {
    let Some(prefix) = upcoach_testing::RedisPrefix::create() else {
        eprintln!("skipped: REDIS_URL is not set");
        return;
    };
    let client = redis::Client::open(prefix.url()).unwrap();
    let conn = upcoach_core::redis::RedisConnection::from_client(
        client.clone(),
        Default::default(),
        "test",
    )
    .await
    .unwrap();
    let namespace = prefix.prefix().trim_end_matches(':');
    let processes: Vec<Sessions> = (0..2)
        .map(|_| builder().redis(Some(&conn), namespace).build())
        .collect();
    let mut admitted = 0;
    for i in 0..200 {
        match processes[i % 2]
            .authorize("google", Some(RETURN_TO), None, None, &from("203.0.113.7"))
            .await
        {
            Ok(_) => admitted += 1,
            Err(e) => assert_eq!(e.code(), "too_many_sign_in_flows"),
        }
    }
    assert_eq!(admitted, 30, "one budget across the processes");
    processes[1]
        .authorize("google", Some(RETURN_TO), None, None, &from("198.51.100.4"))
        .await
        .unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let stored: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{namespace}:flow:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(stored.len(), 31, "{stored:?}");
    let counted: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{namespace}:limit:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        counted.iter().any(|k| k.ends_with(":r:auth.flows")),
        "{counted:?}"
    );
}

/// A limiter given to the builder replaces the default one, with its quota.
#[tokio::test]
async fn a_memory_limiter_given_to_the_builder_applies_its_quota() {
    let limiter = Arc::new(MemoryLimiter::new());
    let sessions = builder()
        .flow_quota(limiter, Quota::new(1, Duration::from_secs(600)).unwrap())
        .build();
    let (admitted, refused) = flood(&sessions, &from("203.0.113.7"), 5).await;
    assert_eq!(
        (admitted, refused.map(|e| e.code())),
        (1, Some("too_many_sign_in_flows"))
    );
}

// ---- The device cookie, through the routes ----

use bytes::Bytes;
use http_body_util::Full;
use upcoach_auth::http::{
    DEVICE_COOKIE, DEVICE_COOKIE_HOST, DEVICE_COOKIE_MAX_AGE, FLOW_COOKIE_HOST,
};
use upcoach_core::event::{EventKind, EventLog, MemoryEventLog};

/// The routes of a service at `public_url` (https: `__Host-` cookies), with a flow
/// quota no test here reaches, recording into `events`.
fn routes_at(public_url: &str, events: Arc<MemoryEventLog>) -> AuthRoutes {
    let tokens = Arc::new(AccessTokens::new(
        SigningKey::generate().unwrap(),
        Arc::new(upcoach_core::SystemClock),
    ));
    AuthRoutes::new(Arc::new(
        Sessions::builder(tokens, public_url)
            .provider(Arc::new(provider(ProviderId::GOOGLE)))
            .return_to_allowlist(vec![RETURN_TO.into()])
            .flow_quota(
                Arc::new(MemoryLimiter::new()),
                Quota::new(1000, Duration::from_secs(600)).unwrap(),
            )
            .events(events)
            .build(),
    ))
}

/// The cookies a browser keeps for the API's origin, as it would: each `Set-Cookie`
/// stored by name, removed by `Max-Age=0`, all sent back in one `Cookie` header.
#[derive(Debug, Default, Clone)]
struct Jar(Vec<(String, String)>);

impl Jar {
    fn keep(&mut self, headers: &http::HeaderMap) {
        for set in headers.get_all("set-cookie") {
            let set = set.to_str().unwrap();
            let (name, value) = set.split(';').next().unwrap().split_once('=').unwrap();
            self.0.retain(|(n, _)| n != name);
            if !set.contains("Max-Age=0") {
                self.0.push((name.to_owned(), value.to_owned()));
            }
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn header(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| {
            self.0
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

/// A request from a browser holding `jar`, with `headers` besides.
fn from_browser(
    method: http::Method,
    uri: &str,
    jar: &Jar,
    headers: &[(&str, &str)],
    body: Option<serde_json::Value>,
) -> http::Request<Full<Bytes>> {
    let mut request = http::Request::builder().method(method).uri(uri);
    if let Some(cookie) = jar.header() {
        request = request.header("cookie", cookie);
    }
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    request.body(Full::new(Bytes::from(body))).unwrap()
}

/// `GET /auth/google/authorize?{query}` from `jar`, which keeps what it sets: the
/// `Set-Cookie` values, and the state to call back with.
async fn start_in(routes: &AuthRoutes, jar: &mut Jar, query: &str) -> (Vec<String>, String) {
    let uri = format!("/auth/google/authorize?{query}");
    let started = routes
        .authorize(
            "google",
            from_browser(http::Method::GET, &uri, jar, &[], None),
        )
        .await;
    assert_eq!(started.status(), 302, "{:?}", started.body());
    jar.keep(started.headers());
    let set: Vec<String> = started
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let location = url::Url::parse(started.headers()["location"].to_str().unwrap()).unwrap();
    (set, state_of(&location))
}

/// A web sign-in from `jar` (authorize with `query`, the callback, and the exchange
/// with `headers` when the callback redirects): the final answer's headers, status and
/// body; `jar` keeps every cookie set on the way.
async fn web_sign_in(
    routes: &AuthRoutes,
    jar: &mut Jar,
    query: &str,
    headers: &[(&str, &str)],
) -> (http::HeaderMap, u16, serde_json::Value) {
    let (_, state) = start_in(routes, jar, query).await;
    let uri = format!("/auth/google/callback?state={state}&code=c");
    let landed = routes
        .callback(
            "google",
            from_browser(http::Method::GET, &uri, jar, headers, None),
        )
        .await;
    jar.keep(landed.headers());
    if landed.status() != 302 {
        return answer(landed).await;
    }
    let back = url::Url::parse(landed.headers()["location"].to_str().unwrap()).unwrap();
    let code = back
        .query_pairs()
        .find(|(k, _)| k == "login_code")
        .unwrap()
        .1
        .into_owned();
    let exchanged = routes
        .exchange(from_browser(
            http::Method::POST,
            "/auth/exchange",
            jar,
            headers,
            Some(serde_json::json!({ "login_code": code })),
        ))
        .await;
    jar.keep(exchanged.headers());
    answer(exchanged).await
}

/// `POST /auth/refresh {"refresh_token"}` from `jar`, with `headers` besides.
async fn refresh_from(
    routes: &AuthRoutes,
    jar: &Jar,
    headers: &[(&str, &str)],
    refresh_token: &serde_json::Value,
) -> (http::HeaderMap, u16, serde_json::Value) {
    answer(
        routes
            .refresh(from_browser(
                http::Method::POST,
                "/auth/refresh",
                jar,
                headers,
                Some(serde_json::json!({ "refresh_token": refresh_token })),
            ))
            .await,
    )
    .await
}

fn web_query() -> String {
    format!(
        "platform=web&return_to={}",
        url::form_urlencoded::byte_serialize(RETURN_TO.as_bytes()).collect::<String>()
    )
}

/// `authorize?platform=web` sets the device cookie, after the flow cookie, when the
/// browser has no valid one: named and scoped like the flow cookie (`__Host-`, `Path=/`,
/// `Secure` behind https; `Path=/auth` on http), `HttpOnly` (no page's script reads it),
/// `SameSite=Lax` (no cross-site POST carries it), for 400 days. A valid one is kept;
/// an invalid one, or two, are none and replaced; other platforms get none.
#[tokio::test]
async fn authorize_gives_a_browser_a_device_cookie() {
    let max_age = DEVICE_COOKIE_MAX_AGE.as_secs();
    assert_eq!(max_age, 400 * 24 * 3600);
    for (public_url, name, attributes) in [
        (
            "https://api.example.test",
            DEVICE_COOKIE_HOST,
            "Path=/; Secure",
        ),
        ("http://127.0.0.1:8080", DEVICE_COOKIE, "Path=/auth"),
    ] {
        let routes = routes_at(public_url, Arc::default());
        let mut jar = Jar::default();
        let (set, _) = start_in(&routes, &mut jar, &web_query()).await;
        assert_eq!(set.len(), 2, "{set:?}");
        assert!(
            set[0].contains("upcoach_flow="),
            "the flow cookie first: {set:?}"
        );
        let device = jar.get(name).expect("a device cookie").to_owned();
        assert_eq!(DeviceId::parse(&device).unwrap().expose().len(), 43);
        assert_eq!(
            set[1],
            format!("{name}={device}; {attributes}; Max-Age={max_age}; HttpOnly; SameSite=Lax"),
        );

        // Kept while valid: the browser stays one device.
        let (set, _) = start_in(&routes, &mut jar, &web_query()).await;
        assert_eq!(set.len(), 1, "only the flow cookie: {set:?}");
        assert_eq!(jar.get(name), Some(device.as_str()));

        // Another browser: another device.
        let mut other = Jar::default();
        start_in(&routes, &mut other, &web_query()).await;
        assert_ne!(other.get(name), Some(device.as_str()));

        // Not a device id, or two cookies of the name (one tossed in): replaced.
        for cookie in [
            format!("{name}=short"),
            format!("{name}=not%20valid%20at%20all"),
            format!("{name}={device}; {name}=tossed-in-by-a-sibling"),
        ] {
            let request = http::Request::get(format!("/auth/google/authorize?{}", web_query()))
                .header("cookie", &cookie)
                .body(())
                .unwrap();
            let started = routes.authorize("google", request).await;
            let mut replaced = Jar::default();
            replaced.keep(started.headers());
            let new = replaced.get(name).expect("replaced");
            assert!(DeviceId::parse(new).is_ok() && new != device, "{cookie}");
        }

        // A flow for another platform (or none) sets no device cookie.
        for query in ["platform=ios", "", "platform=android"] {
            let mut jar = Jar::default();
            let (set, _) = start_in(&routes, &mut jar, query).await;
            assert_eq!(set.len(), 1, "{query}: {set:?}");
            assert!(jar.get(name).is_none(), "{query}");
        }
    }
}

/// The reproduction: `platform` was stored unchecked up to 16 KiB with each flow. Now
/// only the documented platforms pass, and a refused one stores nothing.
#[tokio::test]
async fn an_undocumented_platform_is_refused_before_anything_is_stored() {
    let routes = routes_at("http://127.0.0.1:8080", Arc::default());
    for platform in [
        "webview".to_owned(),
        "x".repeat(16 * 1024),
        "WEB".to_owned(),
    ] {
        let uri = format!("/auth/google/authorize?platform={platform}");
        let jar = Jar::default();
        let answer = routes
            .authorize(
                "google",
                from_browser(http::Method::GET, &uri, &jar, &[], None),
            )
            .await;
        assert_eq!(answer.status(), 400);
        assert!(
            answer.headers().get("set-cookie").is_none(),
            "no flow, no cookie"
        );
        let body = http_body_util::BodyExt::collect(answer.into_body())
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&body.to_bytes()).contains("invalid_platform"));
    }
}

/// The fix: a web app that follows API.md unchanged (`POST /auth/refresh
/// {"refresh_token"}`, no `X-Device-Id`) keeps refreshing, because its browser sends
/// the device cookie; the device id never shows in an answer, an event or a log field.
/// The same token without the cookie (another device; or a cross-site POST, which a
/// `SameSite=Lax` cookie does not go with) is `device_mismatch` and ends the session.
#[tokio::test]
async fn a_web_app_refreshes_with_the_browsers_device_cookie() {
    let events = Arc::new(MemoryEventLog::default());
    let routes = routes_at("https://api.example.test", events.clone());
    let mut jar = Jar::default();
    let (headers, status, tokens) = web_sign_in(&routes, &mut jar, &web_query(), &[]).await;
    assert_eq!(status, 200, "{tokens}");
    let device = jar.get(DEVICE_COOKIE_HOST).unwrap().to_owned();
    assert!(tokens.get("device_id").is_none(), "{tokens}");
    assert_eq!(
        headers.get_all("set-cookie").iter().count(),
        1,
        "the flow cookie cleared, the device cookie left as it is"
    );
    assert!(jar.get(FLOW_COOKIE_HOST).is_none());

    let mut seen = vec![tokens.to_string()];
    let mut token = tokens["refresh_token"].clone();
    for _ in 0..3 {
        let (headers, status, rotated) = refresh_from(&routes, &jar, &[], &token).await;
        assert_eq!(status, 200, "{rotated}");
        assert!(rotated.get("device_id").is_none(), "{rotated}");
        assert!(headers.get("set-cookie").is_none());
        seen.push(rotated.to_string());
        token = rotated["refresh_token"].clone();
    }

    // The same token from a client without the cookie, or with another browser's.
    let mut elsewhere = Jar::default();
    start_in(&routes, &mut elsewhere, &web_query()).await;
    for thief in [Jar::default(), elsewhere] {
        let (_, status, refused) = refresh_from(&routes, &thief, &[], &token).await;
        assert_eq!(
            (status, refused["error"]["code"].as_str()),
            (401, Some("device_mismatch")),
            "{thief:?}"
        );
        seen.push(refused.to_string());
    }
    let (_, status, after) = refresh_from(&routes, &jar, &[], &token).await;
    assert_eq!(
        (status, after["error"]["code"].as_str()),
        (401, Some("refresh_token_revoked")),
        "the mismatch ended the session"
    );

    events.flush().await.unwrap();
    let logged = events.recent(EventKind::Security, 100).await.unwrap();
    assert!(logged.iter().any(|e| e.name() == "refresh_device_mismatch"));
    let text = format!("{logged:?} {}", serde_json::to_string(&logged).unwrap());
    seen.push(text);
    for shown in &seen {
        assert!(!shown.contains(&device), "the device id shows in {shown}");
    }
}

/// A browser that reaches the exchange (or a callback that answers with tokens) with
/// no device cookie, and no `X-Device-Id`: the session is bound to a new id, answered
/// as `device_id` and set as the device cookie. Either carries the refreshes: the
/// cookie (a web app on the API's site) or the header (one that cannot use it).
#[tokio::test]
async fn without_a_device_the_sign_in_makes_one_and_sets_its_cookie() {
    let routes = routes_at("http://127.0.0.1:8080", Arc::default());
    for query in [
        // No platform: authorize set no device cookie.
        format!(
            "return_to={}",
            url::form_urlencoded::byte_serialize(RETURN_TO.as_bytes()).collect::<String>()
        ),
        String::new(),
    ] {
        let mut jar = Jar::default();
        let (headers, status, tokens) = web_sign_in(&routes, &mut jar, &query, &[]).await;
        assert_eq!(status, 200, "{query}: {tokens}");
        let made = tokens["device_id"].as_str().expect("a made device id");
        assert_eq!(made.len(), 43);
        let set: Vec<&str> = headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            set,
            [
                "upcoach_flow=; Path=/auth; Max-Age=0; HttpOnly; SameSite=Lax".to_owned(),
                format!(
                    "upcoach_device={made}; Path=/auth; Max-Age={}; HttpOnly; SameSite=Lax",
                    DEVICE_COOKIE_MAX_AGE.as_secs()
                ),
            ],
            "{query}"
        );
        assert_eq!(jar.get(DEVICE_COOKIE), Some(made));

        let (_, status, rotated) = refresh_from(&routes, &jar, &[], &tokens["refresh_token"]).await;
        assert_eq!(status, 200, "by the cookie: {rotated}");
        let (_, status, rotated) = refresh_from(
            &routes,
            &Jar::default(),
            &[("x-device-id", made)],
            &rotated["refresh_token"],
        )
        .await;
        assert_eq!(status, 200, "by the header: {rotated}");
        assert!(rotated.get("device_id").is_none(), "{rotated}");
    }

    // A later sign-in in the same browser presents that cookie: bound to it, and
    // nothing made or answered.
    let mut jar = Jar::default();
    let (_, _, first) = web_sign_in(&routes, &mut jar, "", &[]).await;
    let (headers, status, second) = web_sign_in(&routes, &mut jar, "", &[]).await;
    assert_eq!(status, 200, "{second}");
    assert!(second.get("device_id").is_none(), "{second}");
    assert_eq!(headers.get_all("set-cookie").iter().count(), 1);
    assert_eq!(jar.get(DEVICE_COOKIE), first["device_id"].as_str());
    let (_, status, _) = refresh_from(&routes, &jar, &[], &second["refresh_token"]).await;
    assert_eq!(status, 200);
}

/// A web sign-in from `jar` whose callback comes without the device cookie `name`, as
/// a cross-site `POST` does: the jar it came with, the callback's headers and its
/// tokens (which answer no `device_id`).
async fn cross_site_sign_in(
    routes: &AuthRoutes,
    jar: &mut Jar,
    name: &str,
) -> (Jar, http::HeaderMap, serde_json::Value) {
    let (_, state) = start_in(routes, jar, "platform=web").await;
    let mut cross_site = jar.clone();
    cross_site.0.retain(|(n, _)| n != name);
    let uri = format!("/auth/google/callback?state={state}&code=c");
    let landed = routes
        .callback(
            "google",
            from_browser(http::Method::GET, &uri, &cross_site, &[], None),
        )
        .await;
    let (headers, status, tokens) = answer(landed).await;
    assert_eq!(status, 200, "{tokens}");
    assert!(tokens.get("device_id").is_none(), "{tokens}");
    (cross_site, headers, tokens)
}

/// A provider that comes back by a cross-site `POST` (Sign in with Apple's form_post):
/// the browser sends its `SameSite=None` flow cookie but not its `SameSite=Lax` device
/// cookie. The callback binds the session to the device the browser had at
/// `authorize` (kept by the flow as a fingerprint), answers no `device_id` and leaves
/// the device cookie as it is; refreshes with that cookie go on, and without it they
/// are `device_mismatch`. Before the fix the session went to a new device and the
/// browser's device cookie was replaced.
#[tokio::test]
async fn a_callback_without_the_device_cookie_binds_to_the_device_of_authorize() {
    for (public_url, name) in [
        ("https://api.example.test", DEVICE_COOKIE_HOST),
        ("http://127.0.0.1:8080", DEVICE_COOKIE),
    ] {
        let routes = routes_at(public_url, Arc::default());
        let mut jar = Jar::default();
        // Signed in before: the browser already holds a device cookie.
        let (_, status, _) = web_sign_in(&routes, &mut jar, &web_query(), &[]).await;
        assert_eq!(status, 200);
        let device = jar.get(name).unwrap().to_owned();

        let (cross_site, headers, tokens) = cross_site_sign_in(&routes, &mut jar, name).await;
        assert_eq!(jar.get(name), Some(device.as_str()), "kept at authorize");
        let set: Vec<&str> = headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert!(
            set.iter().all(|c| !c.starts_with(&format!("{name}="))),
            "the device cookie is left as it is: {set:?}"
        );
        let refresh = &tokens["refresh_token"];
        let (_, status, rotated) = refresh_from(&routes, &jar, &[], refresh).await;
        assert_eq!(status, 200, "with the browser's device cookie: {rotated}");
        let (_, status, refused) =
            refresh_from(&routes, &cross_site, &[], &rotated["refresh_token"]).await;
        assert_eq!(
            (status, refused["error"]["code"].as_str()),
            (401, Some("device_mismatch"))
        );

        // A browser with no device cookie starting a web sign-in is given one at
        // authorize; the cross-site callback binds to that one.
        let mut fresh = Jar::default();
        let (_, _, tokens) = cross_site_sign_in(&routes, &mut fresh, name).await;
        let given = fresh.get(name).expect("a device cookie").to_owned();
        let (_, status, _) = refresh_from(
            &routes,
            &Jar::default(),
            &[("x-device-id", given.as_str())],
            &tokens["refresh_token"],
        )
        .await;
        assert_eq!(status, 200, "bound to the device given at authorize");
    }
}

/// `X-Device-Id` comes before the cookie, and an invalid one is 400 whatever cookie
/// comes with it; an invalid device cookie (or two) is no device, never a 400.
#[tokio::test]
async fn the_header_comes_first_and_a_bad_cookie_is_ignored() {
    let routes = routes_at("https://api.example.test", Arc::default());

    // Exchange with both: bound to the header's device.
    let mut jar = Jar::default();
    let own = "web-app:device-0001";
    let (headers, status, tokens) =
        web_sign_in(&routes, &mut jar, &web_query(), &[("x-device-id", own)]).await;
    assert_eq!(status, 200, "{tokens}");
    assert!(tokens.get("device_id").is_none(), "{tokens}");
    assert_eq!(headers.get_all("set-cookie").iter().count(), 1);
    let (_, status, rotated) = refresh_from(
        &routes,
        &jar,
        &[("x-device-id", own)],
        &tokens["refresh_token"],
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    // An invalid header is 400 even with a valid cookie, and uses nothing up.
    for bad in ["short", "has space in it"] {
        let (_, status, refused) = refresh_from(
            &routes,
            &jar,
            &[("x-device-id", bad)],
            &rotated["refresh_token"],
        )
        .await;
        assert_eq!(
            (status, refused["error"]["code"].as_str()),
            (400, Some("invalid_device_id"))
        );
    }
    let (_, status, refused) = refresh_from(&routes, &jar, &[], &rotated["refresh_token"]).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (401, Some("device_mismatch")),
        "the cookie is another device than the header bound"
    );

    // Bound to the browser's cookie, then presented with a cookie that is not a device
    // id, or with two of them (one tossed in): no device, so a mismatch, not a 400.
    let mut jar = Jar::default();
    start_in(&routes, &mut jar, &web_query()).await;
    let device = jar.get(DEVICE_COOKIE_HOST).unwrap().to_owned();
    let short = Jar(vec![(DEVICE_COOKIE_HOST.into(), "short".into())]);
    let two = Jar(vec![
        (DEVICE_COOKIE_HOST.into(), device.clone()),
        (DEVICE_COOKIE_HOST.into(), "tossed-in-by-a-sibling".into()),
    ]);
    for bad in [short, two] {
        let (_, status, tokens) = web_sign_in(&routes, &mut jar, &web_query(), &[]).await;
        assert_eq!(status, 200, "{tokens}");
        let (_, status, refused) = refresh_from(&routes, &bad, &[], &tokens["refresh_token"]).await;
        assert_eq!(
            (status, refused["error"]["code"].as_str()),
            (401, Some("device_mismatch")),
            "{bad:?}"
        );
    }

    // At the exchange, an invalid cookie is no device: a new one is made and set.
    let mut jar = Jar(vec![(DEVICE_COOKIE_HOST.into(), "short".into())]);
    let (_, state) = start_in(&routes, &mut jar, "").await;
    assert_eq!(
        jar.get(DEVICE_COOKIE_HOST),
        Some("short"),
        "no platform=web"
    );
    let uri = format!("/auth/google/callback?state={state}&code=c");
    let answer_ = routes
        .callback(
            "google",
            from_browser(http::Method::GET, &uri, &jar, &[], None),
        )
        .await;
    jar.keep(answer_.headers());
    let (_, status, tokens) = answer(answer_).await;
    assert_eq!(status, 200, "{tokens}");
    let made = tokens["device_id"].as_str().unwrap();
    assert_eq!(jar.get(DEVICE_COOKIE_HOST), Some(made));
}
