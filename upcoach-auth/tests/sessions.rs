//! `Sessions` as a host uses it, with no server code: every security event carries the
//! client's address, user agent and platform (in memory and in Postgres's
//! `security_events`), and a native nonce is remembered as long as its credential is
//! accepted.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use upcoach_auth::flow::MemoryFlowStore;
use upcoach_auth::refresh::{PgRefreshStore, RefreshPolicy};
use upcoach_auth::session::{AccessTokens, SigningKey};
use upcoach_auth::sessions::Sessions;
use upcoach_auth::users::PgUserStore;
use upcoach_auth::{
    AuthProvider, AuthorizationRequest, Error, NativeCredential, ProviderId, VerifiedIdentity,
};
use upcoach_core::event::{ClientFacts, EventLog, MemoryEventLog, PgEventLog};
use upcoach_core::postgres::MeteredPool;
use upcoach_core::{Clock, ManualClock};

/// Accepts `badge:<subject>` id tokens that stay valid until `valid_until`.
#[derive(Debug)]
struct Badges {
    valid_until: Option<SystemTime>,
}

#[async_trait]
impl AuthProvider for Badges {
    fn id(&self) -> ProviderId {
        ProviderId::Google
    }
    fn authorization_url(&self, request: &AuthorizationRequest) -> Result<url::Url, Error> {
        let mut url = url::Url::parse("https://badges.example.test/authorize").unwrap();
        url.query_pairs_mut().append_pair("state", &request.state);
        Ok(url)
    }
    async fn exchange_code(
        &self,
        _: &str,
        _: &AuthorizationRequest,
        _: &str,
    ) -> Result<VerifiedIdentity, Error> {
        Err(Error::CodeRejected)
    }
    async fn verify_native(
        &self,
        credential: &NativeCredential,
    ) -> Result<VerifiedIdentity, Error> {
        let NativeCredential::IdToken { id_token, .. } = credential else {
            return Err(Error::InvalidCredential {
                reason: "id_token_required",
            });
        };
        let subject = id_token
            .strip_prefix("badge:")
            .ok_or(Error::InvalidCredential {
                reason: "unknown_badge",
            })?;
        Ok(VerifiedIdentity {
            provider: ProviderId::Google,
            subject: subject.to_owned(),
            email: Some(format!("{subject}@example.test")),
            email_verified: true,
            name: None,
            expires_at: self.valid_until,
        })
    }
}

fn facts() -> ClientFacts {
    ClientFacts {
        ip: Some("203.0.113.42".parse().unwrap()),
        user_agent: Some("CoachApp/3.1 (iPhone)".into()),
        platform: Some("ios".into()),
    }
}

fn badge(subject: &str, nonce: &str) -> NativeCredential {
    NativeCredential::IdToken {
        id_token: format!("badge:{subject}"),
        nonce: Some(nonce.into()),
    }
}

/// Signs in, refreshes, replays a refresh token, fails a sign-in and logs out, so each
/// kind of event is recorded once.
async fn every_kind_of_event(sessions: &Sessions) {
    let facts = facts();
    let signed_in = sessions
        .sign_in_with_token("google", badge("ada", "n-1"), &facts)
        .await
        .unwrap();
    let rotated = sessions
        .refresh(&signed_in.refresh_token, &facts)
        .await
        .unwrap();
    let reused = sessions
        .refresh(&signed_in.refresh_token, &facts)
        .await
        .unwrap_err();
    assert_eq!(reused.code(), "refresh_token_reused");
    let failed = sessions
        .sign_in_with_token("google", badge("ada", "n-1"), &facts)
        .await
        .unwrap_err();
    assert_eq!(failed.code(), "nonce_replayed");
    let principal = sessions.authenticate(&rotated.access_token).await.unwrap();
    sessions.logout(&principal, None, &facts).await.unwrap();
}

const KINDS: [&str; 4] = [
    "login_success",
    "refresh_token_reused",
    "login_failed",
    "logout",
];

#[tokio::test]
async fn a_host_gets_client_facts_in_every_security_event_in_memory() {
    let events = Arc::new(MemoryEventLog::default());
    let tokens = Arc::new(AccessTokens::new(
        SigningKey::generate().unwrap(),
        Arc::new(upcoach_core::SystemClock),
    ));
    let sessions = Sessions::builder(tokens, "https://api.example.test")
        .provider(Arc::new(Badges {
            valid_until: Some(SystemTime::now() + Duration::from_secs(300)),
        }))
        .events(events.clone())
        .build();
    every_kind_of_event(&sessions).await;
    let rows = events
        .recent(upcoach_core::event::EventKind::Security, 100)
        .await
        .unwrap();
    for kind in KINDS {
        let row = rows
            .iter()
            .find(|e| e.name() == kind)
            .unwrap_or_else(|| panic!("no {kind} event in {rows:?}"));
        let upcoach_core::event::Event::Security(event) = row else {
            panic!("{row:?}")
        };
        assert_eq!(event.ip_address, facts().ip, "{kind}");
        assert_eq!(event.user_agent, facts().user_agent, "{kind}");
        assert_eq!(event.platform, facts().platform, "{kind}");
    }
}

#[tokio::test]
async fn a_host_gets_client_facts_in_every_security_event_row_in_postgres() {
    let Some(schema) = upcoach_testing::PgSchema::create().await else {
        return;
    };
    upcoach_core::postgres::migrate(schema.pool())
        .await
        .unwrap();
    let pool = MeteredPool::new(schema.pool().clone());
    let events = Arc::new(PgEventLog::new(pool.clone()));
    let tokens = Arc::new(AccessTokens::new(
        SigningKey::generate().unwrap(),
        Arc::new(upcoach_core::SystemClock),
    ));
    let sessions = Sessions::builder(tokens, "https://api.example.test")
        .provider(Arc::new(Badges {
            valid_until: Some(SystemTime::now() + Duration::from_secs(300)),
        }))
        .user_store(Arc::new(PgUserStore::new(pool.clone())))
        .refresh_store(Arc::new(
            PgRefreshStore::new(pool.clone()).with_policy(RefreshPolicy::default()),
        ))
        .events(events.clone())
        .build();
    every_kind_of_event(&sessions).await;
    events.flush().await.unwrap();
    /// `event_type`, `ip_address`, `user_agent`, `platform`.
    type Row = (String, Option<String>, Option<String>, Option<String>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT event_type, host(ip_address), user_agent, platform FROM security_events",
    )
    .fetch_all(schema.pool())
    .await
    .unwrap();
    for kind in KINDS {
        let (_, ip, user_agent, platform) = rows
            .iter()
            .find(|r| r.0 == kind)
            .unwrap_or_else(|| panic!("no {kind} row in {rows:?}"));
        assert_eq!(ip.as_deref(), Some("203.0.113.42"), "{kind}");
        assert_eq!(
            user_agent.as_deref(),
            Some("CoachApp/3.1 (iPhone)"),
            "{kind}"
        );
        assert_eq!(platform.as_deref(), Some("ios"), "{kind}");
    }
}

/// An id token accepted for 90 minutes: its nonce is refused for all of them, not only
/// the first hour.
#[tokio::test]
async fn a_native_nonce_is_remembered_as_long_as_its_token_is_accepted() {
    let clock = Arc::new(ManualClock::starting_now());
    let valid_until = clock.now() + Duration::from_secs(90 * 60);
    let tokens = Arc::new(AccessTokens::new(
        SigningKey::generate().unwrap(),
        clock.clone(),
    ));
    let sessions = Sessions::builder(tokens, "https://api.example.test")
        .provider(Arc::new(Badges {
            valid_until: Some(valid_until),
        }))
        .flow_store(Arc::new(
            MemoryFlowStore::builder().clock(clock.clone()).build(),
        ))
        .clock(clock.clone())
        .build();
    let facts = facts();
    sessions
        .sign_in_with_token("google", badge("ada", "nonce-90"), &facts)
        .await
        .unwrap();
    for minutes in [30, 61, 89] {
        clock.set(valid_until - Duration::from_secs((90 - minutes) * 60));
        let replay = sessions
            .sign_in_with_token("google", badge("ada", "nonce-90"), &facts)
            .await
            .unwrap_err();
        assert_eq!(replay.code(), "nonce_replayed", "after {minutes} minutes");
    }

    // A credential that would outlive what a nonce can be remembered for is refused.
    let forever = Sessions::builder(
        Arc::new(AccessTokens::new(
            SigningKey::generate().unwrap(),
            clock.clone(),
        )),
        "https://api.example.test",
    )
    .provider(Arc::new(Badges {
        valid_until: Some(clock.now() + Duration::from_secs(30 * 24 * 3600)),
    }))
    .clock(clock.clone())
    .build();
    let refused = forever
        .sign_in_with_token("google", badge("ada", "nonce-long"), &facts)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "credential_lifetime_too_long");

    // Nor one that does not say when it expires, nor an id token without a nonce; and
    // one token is taken once, whatever nonce comes with it.
    let unknown = Sessions::builder(
        Arc::new(AccessTokens::new(
            SigningKey::generate().unwrap(),
            clock.clone(),
        )),
        "https://api.example.test",
    )
    .provider(Arc::new(Badges { valid_until: None }))
    .clock(clock.clone())
    .build();
    let refused = unknown
        .sign_in_with_token("google", badge("ada", "nonce-unknown"), &facts)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "credential_lifetime_too_long");
    let no_nonce = NativeCredential::IdToken {
        id_token: "badge:ada".into(),
        nonce: None,
    };
    let refused = sessions
        .sign_in_with_token("google", no_nonce, &facts)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "nonce_required");
    let same_token = sessions
        .sign_in_with_token("google", badge("ada", "a-fresh-nonce"), &facts)
        .await
        .unwrap_err();
    assert_eq!(
        same_token.code(),
        "nonce_replayed",
        "the id token was used before"
    );
}

/// Behind https the flow cookie is `__Host-` prefixed (no sibling subdomain can set or
/// shadow it); a request carrying two flow cookies proves no browser.
#[tokio::test]
async fn the_flow_cookie_cannot_be_tossed_in() {
    use http_body_util::Full;
    use upcoach_auth::http::{AuthRoutes, FLOW_COOKIE_HOST};
    let tokens = Arc::new(AccessTokens::new(
        SigningKey::generate().unwrap(),
        Arc::new(upcoach_core::SystemClock),
    ));
    let sessions = Sessions::builder(tokens, "https://api.example.test")
        .provider(Arc::new(Badges { valid_until: None }))
        .build();
    let routes = AuthRoutes::new(Arc::new(sessions));
    let started = routes
        .authorize(
            "google",
            http::Request::get("/auth/google/authorize?platform=web")
                .body(())
                .unwrap(),
        )
        .await;
    assert_eq!(started.status(), 302, "{:?}", started.body());
    let set_cookie = started.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set_cookie.starts_with(&format!("{FLOW_COOKIE_HOST}="))
            && set_cookie.contains("Path=/;")
            && set_cookie.contains("Secure")
            && set_cookie.contains("HttpOnly")
            && set_cookie.contains("SameSite=Lax"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().unwrap();
    let location = url::Url::parse(started.headers()["location"].to_str().unwrap()).unwrap();
    let state = location
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let tossed = format!("{FLOW_COOKIE_HOST}=tossed-by-a-sibling; {cookie}");
    let answer = routes
        .callback(
            "google",
            http::Request::get(format!("/auth/google/callback?state={state}&code=c"))
                .header("cookie", tossed)
                .body(Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(answer.status(), 401);
    let body: serde_json::Value = serde_json::from_slice(
        &http_body_util::BodyExt::collect(answer.into_body())
            .await
            .unwrap()
            .to_bytes(),
    )
    .unwrap();
    assert_eq!(body["error"]["code"], "flow_browser_mismatch");
}
