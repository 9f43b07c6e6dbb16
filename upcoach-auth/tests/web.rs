//! The browser flow's own checks, with two scripted providers: a callback for another
//! provider's flow (mix-up), a flow from another browser, and one-time login codes.

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

    fn authorization_url(&self, request: &AuthorizationRequest) -> Result<url::Url, Error> {
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
    let google = provider(ProviderId::Google);
    let apple = provider(ProviderId::Apple);
    let started = web
        .begin(
            &google,
            "https://api.example.test/auth/google/callback",
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
    let google = provider(ProviderId::Google);
    for cookie in [None, Some("another-browser")] {
        let started = web
            .begin(&google, "https://api.example.test/cb", None, None, None)
            .await
            .unwrap();
        let params = CallbackParams {
            state: Some(state_of(&started.redirect)),
            code: Some("c".into()),
            error: None,
            iss: None,
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
        )
        .await
        .unwrap();
    let params = CallbackParams {
        state: Some(state_of(&started.redirect)),
        code: Some("c".into()),
        error: None,
        iss: None,
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
    let google = provider(ProviderId::Google);
    let started = web
        .begin(&google, "https://api.example.test/cb", None, None, None)
        .await
        .unwrap();
    let denied = CallbackParams {
        state: Some(state_of(&started.redirect)),
        code: None,
        error: Some("access_denied".into()),
        iss: None,
    };
    assert_eq!(
        web.complete(&google, &denied, Some(&started.browser_cookie))
            .await
            .unwrap_err()
            .code(),
        "provider_denied"
    );
    let started = web
        .begin(&google, "https://api.example.test/cb", None, None, None)
        .await
        .unwrap();
    let no_code = CallbackParams {
        state: Some(state_of(&started.redirect)),
        code: None,
        error: None,
        iss: None,
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
        provider: ProviderId::Google,
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
        provider: ProviderId::Google,
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
    let google = provider(ProviderId::Google);
    let started = web
        .begin(&google, "https://api.example.test/cb", None, None, None)
        .await
        .unwrap();
    let params = CallbackParams {
        state: Some(state_of(&started.redirect)),
        code: Some("c".into()),
        error: None,
        iss: Some("https://attacker.example.test".into()),
    };
    let e = web
        .complete(&google, &params, Some(&started.browser_cookie))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "flow_issuer_mismatch");
    assert_eq!(google.exchanges.load(Ordering::SeqCst), 0);
    let started = web
        .begin(&google, "https://api.example.test/cb", None, None, None)
        .await
        .unwrap();
    let params = CallbackParams {
        state: Some(state_of(&started.redirect)),
        code: Some("c".into()),
        error: None,
        iss: Some("https://provider.example.test".into()),
    };
    assert!(
        web.complete(&google, &params, Some(&started.browser_cookie))
            .await
            .is_ok(),
        "its own issuer passes"
    );
}
