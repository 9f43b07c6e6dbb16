//! `Sessions` as a host uses it, with no server code: every security event carries the
//! client's address, user agent and platform (in memory and in Postgres's
//! `security_events`), a native nonce is remembered as long as its credential is
//! accepted, and sessions are bound to the device they were opened for (natively and
//! through the routes).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use upcoach_auth::flow::MemoryFlowStore;
use upcoach_auth::refresh::{DeviceId, PgRefreshStore, RefreshPolicy};
use upcoach_auth::session::{AccessTokens, SigningKey};
use upcoach_auth::sessions::Sessions;
use upcoach_auth::users::{Erased, LinkingPolicy, PgUserStore, SignIn, User, UserError, UserStore};
use upcoach_auth::{
    AuthProvider, AuthorizationRequest, Error, NativeCredential, ProviderId, VerifiedIdentity,
};
use upcoach_core::event::{ClientFacts, EventLog, MemoryEventLog, PgEventLog};
use upcoach_core::postgres::MeteredPool;
use upcoach_core::{Clock, ManualClock, Role, UserId};

/// Accepts `badge:<subject>` id tokens that stay valid until `valid_until`.
#[derive(Debug)]
struct Badges {
    valid_until: Option<SystemTime>,
}

#[async_trait]
impl AuthProvider for Badges {
    fn id(&self) -> ProviderId {
        ProviderId::GOOGLE
    }
    async fn authorization_url(&self, request: &AuthorizationRequest) -> Result<url::Url, Error> {
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
            provider: ProviderId::GOOGLE,
            subject: subject.to_owned(),
            email: Some(format!("{subject}@example.test")),
            email_verified: true,
            name: None,
            expires_at: self.valid_until,
        })
    }
}

/// Sessions with fresh access tokens and the badge provider (badges good for 5 min).
fn badge_sessions() -> upcoach_auth::sessions::SessionsBuilder {
    let tokens = Arc::new(AccessTokens::new(
        SigningKey::generate().unwrap(),
        Arc::new(upcoach_core::SystemClock),
    ));
    Sessions::builder(tokens, "https://api.example.test").provider(Arc::new(Badges {
        valid_until: Some(SystemTime::now() + Duration::from_secs(300)),
    }))
}

fn facts() -> ClientFacts {
    ClientFacts {
        ip: Some("203.0.113.42".parse().unwrap()),
        user_agent: Some("CoachApp/3.1 (iPhone)".into()),
        platform: Some("ios".into()),
    }
}

fn phone() -> DeviceId {
    DeviceId::parse("6F9619FF-8B86-D011-B42D-00CF4FC964FF").unwrap()
}

fn laptop() -> DeviceId {
    DeviceId::parse("laptop:0001").unwrap()
}

fn badge(subject: &str, nonce: &str) -> NativeCredential {
    NativeCredential::IdToken {
        id_token: format!("badge:{subject}"),
        nonce: Some(nonce.into()),
    }
}

/// Signs in, refreshes, replays a refresh token, fails a sign-in, logs out, and
/// refreshes from another device, so each kind of event is recorded. Returns the
/// refresh tokens it saw.
async fn every_kind_of_event(sessions: &Sessions) -> Vec<String> {
    let facts = facts();
    let signed_in = sessions
        .sign_in_with_token("google", badge("ada", "n-1"), None, Some(&phone()), &facts)
        .await
        .unwrap();
    assert_eq!(signed_in.device_id, None, "the app knows its own device id");
    let rotated = sessions
        .refresh(&signed_in.refresh_token, Some(&phone()), &facts)
        .await
        .unwrap();
    assert_eq!(rotated.device_id, None);
    let reused = sessions
        .refresh(&signed_in.refresh_token, Some(&phone()), &facts)
        .await
        .unwrap_err();
    assert_eq!(reused.code(), "refresh_token_reused");
    let failed = sessions
        .sign_in_with_token("google", badge("ada", "n-1"), None, Some(&phone()), &facts)
        .await
        .unwrap_err();
    assert_eq!(failed.code(), "nonce_replayed");
    let principal = sessions.authenticate(&rotated.access_token).await.unwrap();
    sessions.logout(&principal, None, &facts).await.unwrap();

    // A stolen token, used from another device: refused, and the session is over.
    let again = sessions
        .sign_in_with_token(
            "google",
            badge("grace", "n-2"),
            None,
            Some(&phone()),
            &facts,
        )
        .await
        .unwrap();
    let stolen = sessions
        .refresh(&again.refresh_token, Some(&laptop()), &facts)
        .await
        .unwrap_err();
    assert_eq!(stolen.code(), "device_mismatch");
    let after = sessions
        .refresh(&again.refresh_token, Some(&phone()), &facts)
        .await
        .unwrap_err();
    assert_eq!(after.code(), "refresh_token_revoked");
    vec![
        signed_in.refresh_token,
        rotated.refresh_token,
        again.refresh_token,
    ]
}

const KINDS: [&str; 5] = [
    "login_success",
    "refresh_token_reused",
    "login_failed",
    "logout",
    "refresh_device_mismatch",
];

#[tokio::test]
async fn a_host_gets_client_facts_in_every_security_event_in_memory() {
    let events = Arc::new(MemoryEventLog::default());
    let sessions = badge_sessions().events(events.clone()).build();
    let tokens = every_kind_of_event(&sessions).await;
    let rows = events
        .recent(upcoach_core::event::EventKind::Security, 100)
        .await
        .unwrap();
    let mismatch = rows
        .iter()
        .find_map(|e| match e {
            upcoach_core::event::Event::Security(e)
                if e.event_type == "refresh_device_mismatch" =>
            {
                Some(e)
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(mismatch.details["device_id_presented"], true);
    assert!(mismatch.details["family_id"].is_string());
    let text = format!("{rows:?}");
    for secret in tokens
        .iter()
        .map(String::as_str)
        .chain([phone().expose(), laptop().expose()])
    {
        assert!(!text.contains(secret), "an event shows {secret}");
    }
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
    let sessions = badge_sessions()
        .user_store(Arc::new(PgUserStore::new(pool.clone())))
        .refresh_store(Arc::new(
            PgRefreshStore::new(pool.clone()).with_policy(RefreshPolicy::default()),
        ))
        .events(events.clone())
        .build();
    let tokens = every_kind_of_event(&sessions).await;
    events.flush().await.unwrap();
    let dump: String = sqlx::query_scalar("SELECT string_agg(e::text, ' ') FROM security_events e")
        .fetch_one(schema.pool())
        .await
        .unwrap();
    for secret in tokens
        .iter()
        .map(String::as_str)
        .chain([phone().expose(), laptop().expose()])
    {
        assert!(!dump.contains(secret), "a row shows {secret}");
    }
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
        .sign_in_with_token("google", badge("ada", "nonce-90"), None, None, &facts)
        .await
        .unwrap();
    for minutes in [30, 61, 89] {
        clock.set(valid_until - Duration::from_secs((90 - minutes) * 60));
        let replay = sessions
            .sign_in_with_token("google", badge("ada", "nonce-90"), None, None, &facts)
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
        .sign_in_with_token("google", badge("ada", "nonce-long"), None, None, &facts)
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
        .sign_in_with_token("google", badge("ada", "nonce-unknown"), None, None, &facts)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "credential_lifetime_too_long");
    let no_nonce = NativeCredential::IdToken {
        id_token: "badge:ada".into(),
        nonce: None,
    };
    let refused = sessions
        .sign_in_with_token("google", no_nonce, None, None, &facts)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "nonce_required");
    let same_token = sessions
        .sign_in_with_token("google", badge("ada", "a-fresh-nonce"), None, None, &facts)
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

/// What a route answered: status, JSON body.
async fn answer(response: upcoach_auth::http::Answer) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

fn post(
    path: &str,
    headers: &[(&str, &str)],
    body: serde_json::Value,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut request = http::Request::post(path).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap()
}

/// Native apps name their device in `X-Device-Id` (or the body's `device_id`) at
/// sign-in and on every refresh; an app that names none gets a session bound to no
/// device, as before device ids.
#[tokio::test]
async fn native_sessions_are_bound_to_the_device_the_app_names() {
    use serde_json::json;
    use upcoach_auth::http::AuthRoutes;
    let sessions = badge_sessions().build();
    let routes = AuthRoutes::new(Arc::new(sessions));
    let phone = phone();
    // A new id token each time: each is taken once.
    let sign_in = |nonce: &str| json!({"id_token": format!("badge:{nonce}"), "nonce": nonce, "platform": "ios"});

    // Bad ids, a header given twice, a header and a body that disagree: 400.
    for (headers, body) in [
        (vec![("x-device-id", "short")], sign_in("bad-1")),
        (vec![("x-device-id", "has space in it")], sign_in("bad-2")),
        (
            vec![
                ("x-device-id", "device-0001"),
                ("x-device-id", "device-0001"),
            ],
            sign_in("bad-3"),
        ),
        (
            vec![("x-device-id", "device-0001")],
            json!({"id_token": "badge:ada", "nonce": "bad-4", "device_id": "device-0002"}),
        ),
        (
            vec![],
            json!({"id_token": "badge:ada", "nonce": "bad-5", "device_id": "x"}),
        ),
    ] {
        let (status, body) = answer(
            routes
                .token("google", post("/auth/google/token", &headers, body))
                .await,
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_device_id")),
            "{headers:?}"
        );
    }

    // Bound by the header; the answer does not repeat the device id, and no cookie is
    // set for a native app.
    let signed_in = routes
        .token(
            "google",
            post(
                "/auth/google/token",
                &[("x-device-id", phone.expose())],
                sign_in("n-1"),
            ),
        )
        .await;
    assert!(signed_in.headers().get("set-cookie").is_none());
    let (status, tokens) = answer(signed_in).await;
    assert_eq!(status, 200, "{tokens}");
    assert!(tokens.get("device_id").is_none(), "{tokens}");
    let refresh = |token: &serde_json::Value, headers: &[(&str, &str)]| {
        post("/auth/refresh", headers, json!({"refresh_token": token}))
    };
    let (status, rotated) = answer(
        routes
            .refresh(refresh(
                &tokens["refresh_token"],
                &[("x-device-id", phone.expose())],
            ))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    assert!(rotated.get("device_id").is_none(), "{rotated}");
    let (status, refused) = answer(
        routes
            .refresh(refresh(&rotated["refresh_token"], &[]))
            .await,
    )
    .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (401, Some("device_mismatch"))
    );
    let (status, refused) = answer(
        routes
            .refresh(refresh(
                &rotated["refresh_token"],
                &[("x-device-id", phone.expose())],
            ))
            .await,
    )
    .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (401, Some("refresh_token_revoked")),
        "the mismatch ended the session"
    );
    let (status, refused) = answer(
        routes
            .refresh(refresh(&rotated["refresh_token"], &[("x-device-id", "no")]))
            .await,
    )
    .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (400, Some("invalid_device_id"))
    );

    // Bound by the body's device_id just the same.
    let body = json!({"id_token": "badge:n-2", "nonce": "n-2", "platform": "android", "device_id": laptop().expose()});
    let (status, tokens) = answer(
        routes
            .token("google", post("/auth/google/token", &[], body))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{tokens}");
    let (status, refused) = answer(
        routes
            .refresh(refresh(
                &tokens["refresh_token"],
                &[("x-device-id", phone.expose())],
            ))
            .await,
    )
    .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (401, Some("device_mismatch"))
    );

    // No device named: not bound, and no device_id in the answer. A device cookie
    // (the app's HTTP client keeps cookies) names no device at the native route.
    let cookie = "__Host-upcoach_device=6F9619FF-8B86-D011-B42D-00CF4FC964FF";
    let (status, tokens) = answer(
        routes
            .token(
                "google",
                post("/auth/google/token", &[("cookie", cookie)], sign_in("n-3")),
            )
            .await,
    )
    .await;
    assert_eq!(status, 200, "{tokens}");
    assert!(tokens.get("device_id").is_none(), "{tokens}");
    let (status, rotated) =
        answer(routes.refresh(refresh(&tokens["refresh_token"], &[])).await).await;
    assert_eq!(status, 200, "{rotated}");
    let (status, rotated) = answer(
        routes
            .refresh(refresh(
                &rotated["refresh_token"],
                &[("x-device-id", phone.expose())],
            ))
            .await,
    )
    .await;
    assert_eq!(
        status, 200,
        "an unbound session refreshes from any device: {rotated}"
    );
}

/// A user store whose next `failing` reads of a user fail as a dead pooled connection
/// does (retryable); everything else is the memory store's.
#[derive(Debug, Default)]
struct DroppingReads {
    inner: upcoach_auth::users::MemoryUserStore,
    failing: std::sync::atomic::AtomicU32,
    reads: std::sync::atomic::AtomicU32,
}

#[async_trait]
impl UserStore for DroppingReads {
    async fn sign_in(
        &self,
        identity: &VerifiedIdentity,
        policy: &LinkingPolicy,
    ) -> Result<SignIn, UserError> {
        self.inner.sign_in(identity, policy).await
    }
    async fn get(&self, user_id: UserId) -> Result<Option<User>, UserError> {
        use std::sync::atomic::Ordering::SeqCst;
        self.reads.fetch_add(1, SeqCst);
        let dropped = self
            .failing
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if dropped {
            return Err(UserError::Backend {
                backend: "test",
                source: "the connection was terminated".into(),
            });
        }
        self.inner.get(user_id).await
    }
    async fn find_by_identity(
        &self,
        provider: ProviderId,
        subject: &str,
    ) -> Result<Option<User>, UserError> {
        self.inner.find_by_identity(provider, subject).await
    }
    async fn link(&self, user_id: UserId, identity: &VerifiedIdentity) -> Result<User, UserError> {
        self.inner.link(user_id, identity).await
    }
    async fn unlink(&self, user_id: UserId, provider: ProviderId) -> Result<User, UserError> {
        self.inner.unlink(user_id, provider).await
    }
    async fn erase_identity(
        &self,
        provider: ProviderId,
        subject: &str,
    ) -> Result<Option<Erased>, UserError> {
        self.inner.erase_identity(provider, subject).await
    }
    async fn set_email_deliverable(
        &self,
        provider: ProviderId,
        subject: &str,
        deliverable: bool,
    ) -> Result<Option<UserId>, UserError> {
        (self.inner)
            .set_email_deliverable(provider, subject, deliverable)
            .await
    }
    async fn email_deliverable(
        &self,
        provider: ProviderId,
        subject: &str,
    ) -> Result<Option<bool>, UserError> {
        self.inner.email_deliverable(provider, subject).await
    }
    async fn set_roles(&self, user_id: UserId, roles: &[Role]) -> Result<User, UserError> {
        self.inner.set_roles(user_id, roles).await
    }
    async fn provision(&self, user_id: UserId, roles: &[Role]) -> Result<User, UserError> {
        self.inner.provision(user_id, roles).await
    }
}

/// A refresh rotates first and reads its user after: a read that meets a dead
/// connection is asked again (at most three reads in all), so a store that comes back
/// at once answers the refresh instead of leaving a rotated family whose client, told
/// 503, would retry its old token (reuse, and the family revoked). A store still down
/// after three reads answers 503 `user_store_unavailable`.
#[tokio::test]
async fn a_refresh_whose_user_read_meets_a_dead_connection_reads_again() {
    use std::sync::atomic::Ordering::SeqCst;
    let users = Arc::new(DroppingReads::default());
    let sessions = badge_sessions().user_store(users.clone()).build();
    let signed_in = sessions
        .sign_in_with_token("google", badge("ada", "n-1"), None, None, &facts())
        .await
        .unwrap();

    users.failing.store(2, SeqCst);
    users.reads.store(0, SeqCst);
    let rotated = sessions
        .refresh(&signed_in.refresh_token, None, &facts())
        .await
        .expect("the third read answers");
    assert_eq!(
        users.reads.load(SeqCst),
        3,
        "two failed reads, then one that answered"
    );
    assert_eq!(rotated.user.id, signed_in.user.id);

    users.failing.store(10, SeqCst);
    users.reads.store(0, SeqCst);
    let refused = sessions
        .refresh(&rotated.refresh_token, None, &facts())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "user_store_unavailable");
    assert_eq!(users.reads.load(SeqCst), 3, "three reads at most");
}
