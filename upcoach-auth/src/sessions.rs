//! [`Sessions`]: the sign-in service a host embeds. One type for every step of every
//! provider (authorize, callback, native sign-in, login-code exchange, refresh, logout,
//! me, link, unlink), which issues our tokens, enforces the one-time nonce and login
//! code, and records each security event itself, with the client's address, user agent
//! and platform ([`ClientFacts`]).
//!
//! **Devices.** Every session a browser sign-in opens is bound to a device
//! ([`refresh::device`](crate::refresh::device)): the [`DeviceId`] the browser presents
//! at [`exchange`](Sessions::exchange) (or at the [`callback`](Sessions::callback) when
//! it answers with tokens), or a random one made there. Over HTTP
//! (`upcoach_auth::http`, feature `http`) a browser presents the device cookie it got
//! at `authorize`, or the web app its own `X-Device-Id`; a made id is the one case the
//! [`TokenResponse`] carries as `device_id` (and the routes set as the device cookie),
//! to be presented again on every [`refresh`](Sessions::refresh). A native sign-in is
//! bound to the device id the app presents; one that presents none is not bound (so
//! apps that predate device ids keep working), nor is a session from
//! [`issue_for`](Sessions::issue_for). A refresh from another device (or with no device
//! id, for a bound session) is refused with `device_mismatch`, revokes the session and
//! is recorded as `refresh_device_mismatch`. A device id is never recorded in an event
//! nor answered back: only a made one, once, as `device_id`.
//!
//! **Stored flows.** Each browser sign-in started ([`authorize`](Sessions::authorize))
//! stores a flow for ten minutes, before anyone has signed in. So that a flood of them
//! neither fills the [`FlowStore`] (every web sign-in would then fail until flows
//! expire) nor grows Redis without end, the service admits flows through a
//! [`RateLimiter`]: per client address (rule `auth.flows`, subject
//! [`ip_subject`](upcoach_core::limit::ip_subject) of [`ClientFacts::ip`], `ip:unknown`
//! for requests whose address is unknown; default [`DEFAULT_FLOWS_PER_ADDRESS`] per
//! ten minutes, over it 429 `too_many_sign_in_flows`), and in total (rule
//! `auth.flows.total`; default [`DEFAULT_FLOWS_TOTAL`] per ten minutes, over it 503
//! `sign_in_busy`). The window is the flow's lifetime, so a limiter that admits `n` per
//! window leaves at most about `2n` flows alive (a full burst, then the refill over
//! the ten minutes). When the limiter cannot answer (its Redis is down), sign-in fails
//! closed: 503 `rate_limiter_unavailable`. The default limiter is in this process;
//! with [`SessionsBuilder::redis`] it is in Redis, one budget for every process
//! (or give your own: [`SessionsBuilder::flow_limiter`]).
//!
//! A provider is anything implementing [`AuthProvider`]; the service needs nothing
//! else from it. A host adds its own:
//!
//! ```
//! use std::sync::Arc;
//! use async_trait::async_trait;
//! use upcoach_auth::refresh::DeviceId;
//! use upcoach_auth::session::{AccessTokens, SigningKey};
//! use upcoach_auth::sessions::Sessions;
//! use upcoach_auth::{AuthProvider, AuthorizationRequest, Error, NativeCredential, ProviderId, VerifiedIdentity};
//! use upcoach_core::event::{ClientFacts, EventKind, EventLog, MemoryEventLog};
//! use upcoach_core::SystemClock;
//!
//! /// A provider of the host's own: accepts one test credential.
//! #[derive(Debug)]
//! struct Staff;
//!
//! #[async_trait]
//! impl AuthProvider for Staff {
//!     fn id(&self) -> ProviderId { ProviderId::GOOGLE }
//!     async fn authorization_url(&self, request: &AuthorizationRequest) -> Result<url::Url, Error> {
//!         let mut url = url::Url::parse("https://sso.staff.example/authorize").unwrap();
//!         url.query_pairs_mut().append_pair("state", &request.state);
//!         Ok(url)
//!     }
//!     async fn exchange_code(&self, _: &str, _: &AuthorizationRequest, _: &str)
//!         -> Result<VerifiedIdentity, Error> {
//!         Err(Error::CodeRejected)
//!     }
//!     async fn verify_native(&self, credential: &NativeCredential) -> Result<VerifiedIdentity, Error> {
//!         match credential {
//!             NativeCredential::IdToken { id_token, .. } if id_token == "badge-42" => Ok(VerifiedIdentity {
//!                 provider: ProviderId::GOOGLE,
//!                 subject: "staff-42".into(),
//!                 email: Some("ada@staff.example".into()),
//!                 email_verified: true,
//!                 name: Some("Ada".into()),
//!                 // Until when this credential is accepted: its nonce is kept that long.
//!                 expires_at: Some(std::time::SystemTime::now() + std::time::Duration::from_secs(300)),
//!             }),
//!             _ => Err(Error::InvalidCredential { reason: "unknown_badge" }),
//!         }
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let events = Arc::new(MemoryEventLog::default());
//! let tokens = Arc::new(AccessTokens::new(SigningKey::generate()?, Arc::new(SystemClock)));
//! let sessions = Sessions::builder(tokens, "https://api.example.com")
//!     .provider(Arc::new(Staff))
//!     .events(events.clone())
//!     .build();
//!
//! let facts = ClientFacts {
//!     ip: Some("203.0.113.9".parse().unwrap()),
//!     user_agent: Some("StaffApp/1.0".into()),
//!     platform: Some("ios".into()),
//! };
//! let credential = NativeCredential::IdToken { id_token: "badge-42".into(), nonce: Some("n-1".into()) };
//! let phone: DeviceId = "6F9619FF-8B86-D011-B42D-00CF4FC964FF".parse()?;
//! let signed_in = sessions.sign_in_with_token("google", credential, None, Some(&phone), &facts).await.unwrap();
//! assert_eq!(signed_in.user.email.as_deref(), Some("ada@staff.example"));
//!
//! let rotated = sessions.refresh(&signed_in.refresh_token, Some(&phone), &facts).await.unwrap();
//! assert_ne!(rotated.refresh_token, signed_in.refresh_token);
//!
//! // The newest token, from another device: refused, and the session is over.
//! let laptop: DeviceId = "laptop-0001".parse()?;
//! let stolen = sessions.refresh(&rotated.refresh_token, Some(&laptop), &facts).await.unwrap_err();
//! assert_eq!(stolen.code(), "device_mismatch");
//!
//! events.flush().await?;
//! let logged = events.recent(EventKind::Security, 10).await?;
//! assert!(logged.iter().any(|e| e.name() == "login_success"));
//! assert!(logged.iter().any(|e| e.name() == "refresh_device_mismatch"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use upcoach_core::event::{ClientFacts, Event, EventLog, MemoryEventLog, SecurityEvent};
use upcoach_core::limit::{Decision, LimitError, MemoryLimiter, Quota, RateLimiter};
use upcoach_core::{Clock, Principal, Role, Secret, SessionId, SystemClock, TokenError, UserId};

use crate::apple::{AppleEventKind, AppleProvider};
use crate::config::AuthConfig;
use crate::deletion::{
    ConfirmationCode, DeletionError, DeletionOutcome, DeletionRequest, DeletionStore,
    MemoryDeletionStore,
};
use crate::flow::{FlowError, FlowStore, MemoryFlowStore};
use crate::refresh::{
    DeviceFingerprint, DeviceId, InvalidDeviceId, MemoryRefreshStore, Purged, RefreshError,
    RefreshPolicy, RefreshStore, RevokeReason,
};
use crate::session::AccessTokens;
use crate::users::{LinkingPolicy, MemoryUserStore, User, UserError, UserStore};
use crate::web::{CallbackParams, LoginGrant, LoginProof, SignInError, Started, WebSignIn};
use crate::{AuthProvider, Error, NativeCredential, ProviderId, VerifiedIdentity};

/// The platforms a client may name (API.md): checked before anything is stored.
pub const PLATFORMS: [&str; 3] = ["web", "ios", "android"];

/// The rate-limit rule of browser sign-ins started per client address.
pub const FLOW_RULE: &str = "auth.flows";
/// The rate-limit rule of browser sign-ins started in total.
pub const FLOW_TOTAL_RULE: &str = "auth.flows.total";
/// The subject of [`FLOW_TOTAL_RULE`].
pub const FLOW_TOTAL_SUBJECT: &str = "all";
/// The subject shared by every request whose client address is unknown.
pub const UNKNOWN_ADDRESS_SUBJECT: &str = "ip:unknown";

/// The longest an Apple notification's key is remembered, so a replay is refused: a
/// notification is remembered until its `exp` (plus the leeway), at most this long; one
/// older than [`NOTIFICATION_MAX_AGE`](crate::apple::NOTIFICATION_MAX_AGE) (by `iat`) is
/// refused as stale, so no replay outlives the memory.
pub const APPLE_NOTIFICATION_MEMORY: Duration = crate::flow::MAX_TTL;

/// How long to remember a notification that expires at `expires_at`, at `now` (both
/// seconds since the epoch): until then plus the leeway and a second, at most
/// [`APPLE_NOTIFICATION_MEMORY`]; that long when it names no expiry.
fn notification_memory(expires_at: Option<u64>, now: u64) -> Duration {
    expires_at.map_or(APPLE_NOTIFICATION_MEMORY, |exp| {
        Duration::from_secs(exp.saturating_sub(now))
            .saturating_add(crate::oidc::DEFAULT_LEEWAY)
            .saturating_add(Duration::from_secs(1))
            .min(APPLE_NOTIFICATION_MEMORY)
    })
}

/// Browser sign-ins one address may start per [`FLOW_TTL`](crate::web::FLOW_TTL) (ten
/// minutes), by default: 30 at once, then one every 20 s. A person needs one (a few
/// with retries and tabs); 30 leaves room for a household or a small office behind one
/// address, and holds one address to about 60 stored flows.
pub const DEFAULT_FLOWS_PER_ADDRESS: u32 = 30;

/// Browser sign-ins all clients together may start per
/// [`FLOW_TTL`](crate::web::FLOW_TTL), by default: about 16 a second, sustained; at
/// most about 20,000 stored flows (some 20 MB), whatever the number of addresses.
pub const DEFAULT_FLOWS_TOTAL: u32 = 10_000;

/// Why a sign-in step was refused. Each has a stable [`code`](Self::code); with the
/// `http` feature, [`HttpError`](upcoach_core::http::HttpError) gives its status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No provider of that name is configured, or the name is not a provider name.
    #[error("unknown provider")]
    UnknownProvider,
    /// The provider is not configured on this server.
    #[error("{0} sign-in is not configured on this server")]
    ProviderNotConfigured(ProviderId),
    /// The platform is not one of [`PLATFORMS`].
    #[error("platform must be web, ios or android")]
    InvalidPlatform,
    /// The native credential's nonce was used before (a replayed id token).
    #[error("this nonce was used before")]
    NonceReplayed,
    /// The credential does not say when it expires, or stays valid for longer than a
    /// nonce can be remembered ([`MAX_TTL`](crate::flow::MAX_TTL)).
    #[error("the credential does not expire, or not soon enough, for this server")]
    CredentialLivesTooLong,
    /// The user behind a login code, refresh token or access token no longer exists.
    #[error("the user no longer exists")]
    UserGone {
        /// The code clients see (`login_code_invalid`, `refresh_token_revoked`,
        /// `unknown_user`).
        code: &'static str,
    },
    /// The access token could not be signed.
    #[error("signing an access token failed")]
    Signing(#[source] Error),
    /// The provider refused the credential or could not be reached.
    #[error(transparent)]
    Provider(#[from] Error),
    /// A browser-flow step was refused.
    #[error(transparent)]
    SignIn(#[from] SignInError),
    /// The user store refused or failed.
    #[error(transparent)]
    Users(#[from] UserError),
    /// The refresh-token store refused or failed.
    #[error(transparent)]
    Refresh(#[from] RefreshError),
    /// The flow store failed.
    #[error(transparent)]
    Flow(#[from] FlowError),
    /// The device id is not 8 to 128 characters of `A-Z a-z 0-9 . _ : -`.
    #[error(transparent)]
    InvalidDeviceId(#[from] InvalidDeviceId),
    /// This client address started too many sign-ins ([`FLOW_RULE`]); try again after
    /// `decision.retry_after`.
    #[error("too many sign-ins were started from this address; retry later")]
    TooManySignInFlows {
        /// The quota that refused.
        quota: Quota,
        /// The limiter's answer.
        decision: Decision,
    },
    /// All clients together started too many sign-ins ([`FLOW_TOTAL_RULE`]); try again
    /// after `decision.retry_after`.
    #[error("too many sign-ins are under way; retry later")]
    SignInBusy {
        /// The quota that refused.
        quota: Quota,
        /// The limiter's answer.
        decision: Decision,
    },
    /// The rate limiter that admits sign-ins could not answer: sign-in fails closed.
    #[error("the sign-in rate limiter failed")]
    FlowLimiter(#[source] LimitError),
    /// A Facebook callback's `signed_request` was refused.
    #[error(transparent)]
    Facebook(#[from] crate::facebook::FacebookError),
    /// A Sign in with Apple notification was refused.
    #[error(transparent)]
    Apple(#[from] crate::apple::AppleError),
    /// This provider notification was acted on before (same `jti` or event).
    #[error("this notification was handled before")]
    NotificationReplayed,
    /// The data-deletion store refused or failed.
    #[error(transparent)]
    Deletion(#[from] DeletionError),
    /// No data-deletion request has this confirmation code (or it is past its
    /// retention).
    #[error("no data-deletion request has this confirmation code")]
    DeletionRequestNotFound,
}

impl AuthError {
    /// A stable snake_case code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::UnknownProvider => "unknown_provider",
            AuthError::ProviderNotConfigured(_) => "provider_not_configured",
            AuthError::InvalidPlatform => "invalid_platform",
            AuthError::NonceReplayed => "nonce_replayed",
            AuthError::CredentialLivesTooLong => "credential_lifetime_too_long",
            AuthError::UserGone { code } => code,
            AuthError::Signing(_) => "internal_error",
            AuthError::Provider(e) => e.code(),
            AuthError::SignIn(e) => e.code(),
            AuthError::Users(e) => e.code(),
            AuthError::Refresh(e) => e.code(),
            AuthError::Flow(e) => e.code(),
            AuthError::InvalidDeviceId(e) => e.code(),
            AuthError::TooManySignInFlows { .. } => "too_many_sign_in_flows",
            AuthError::SignInBusy { .. } => "sign_in_busy",
            AuthError::FlowLimiter(e) => e.code(),
            AuthError::Facebook(e) => e.code(),
            AuthError::Apple(e) => e.code(),
            AuthError::NotificationReplayed => "notification_replayed",
            AuthError::Deletion(e) => e.code(),
            AuthError::DeletionRequestNotFound => "deletion_request_not_found",
        }
    }

    /// How long to wait before trying again, when the error says
    /// ([`AuthError::TooManySignInFlows`], [`AuthError::SignInBusy`]).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AuthError::TooManySignInFlows { decision, .. }
            | AuthError::SignInBusy { decision, .. } => Some(decision.retry_after),
            _ => None,
        }
    }

    /// Whether trying again later could succeed (a store or the provider was down).
    pub fn is_retryable(&self) -> bool {
        match self {
            AuthError::Provider(e) => e.is_retryable(),
            AuthError::SignIn(e) => e.is_retryable(),
            AuthError::Users(e) => e.is_retryable(),
            AuthError::Refresh(e) => e.is_retryable(),
            AuthError::Flow(e) => e.is_retryable(),
            AuthError::TooManySignInFlows { .. } | AuthError::SignInBusy { .. } => true,
            AuthError::FlowLimiter(e) => matches!(e, LimitError::Unavailable(_)),
            AuthError::Apple(e) => e.is_retryable(),
            AuthError::Deletion(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// How many times [`Sessions::refresh`] reads a rotated session's user before it
/// gives up (pauses of 25, 100 ms between): enough to get past a pooled connection that
/// died.
const ROTATION_USER_TRIES: u32 = 3;

/// How long after a first failed read [`Sessions::refresh`] may go on trying, pauses
/// included.
const ROTATION_USER_BUDGET: Duration = Duration::from_secs(1);

/// `{"access_token","token_type":"Bearer","expires_in","refresh_token","user"}`, and
/// `"device_id"` when the session was just bound to a device id the server made.
#[derive(Clone, Serialize)]
pub struct TokenResponse {
    /// Our access token (an EdDSA JWT).
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// The refresh token (opaque, one use).
    pub refresh_token: String,
    /// The signed-in user.
    pub user: User,
    /// The device id the server made for a browser sign-in that presented none, which
    /// the session is now bound to: present it as `X-Device-Id` on every refresh (a
    /// browser on the API's site sends the device cookie instead). Absent otherwise: the
    /// session is bound to the id the client presented (which it knows), or to none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("expires_in", &self.expires_in)
            .field("user", &self.user.id)
            .finish_non_exhaustive()
    }
}

/// How a browser sign-in ends at the callback.
#[derive(Debug)]
pub enum CallbackOutcome {
    /// No `return_to`: the tokens, for the caller to answer with.
    SignedIn(TokenResponse),
    /// Back to the web app with a one-time login code: `return_to?login_code=…`. The
    /// browser keeps its flow cookie: it is one proof that the exchange comes from it.
    Redirect(url::Url),
}

/// The sign-in service. Build one with [`Sessions::builder`]; see the [module
/// docs](self).
pub struct Sessions {
    tokens: Arc<AccessTokens>,
    refresh: Arc<dyn RefreshStore>,
    users: Arc<dyn UserStore>,
    web: WebSignIn,
    providers: HashMap<ProviderId, Arc<dyn AuthProvider>>,
    linking: LinkingPolicy,
    events: Arc<dyn EventLog>,
    clock: Arc<dyn Clock>,
    public_url: String,
    flow_quota: FlowQuota,
    /// The Facebook app secret, which signs Facebook's callbacks (when configured).
    facebook_secret: Option<Secret>,
    /// Sign in with Apple, whose keys verify its notifications (when configured).
    apple: Option<Arc<AppleProvider>>,
    /// Data-deletion requests and their confirmation codes.
    deletions: Arc<dyn DeletionStore>,
}

/// How browser sign-ins are admitted before their flow is stored.
#[derive(Debug, Clone)]
struct FlowQuota {
    limiter: Arc<dyn RateLimiter>,
    per_address: Quota,
    total: Option<Quota>,
}

/// `limit` per [`FLOW_TTL`](crate::web::FLOW_TTL).
fn flows_per_ttl(limit: u32) -> Quota {
    Quota::new(limit, crate::web::FLOW_TTL).unwrap_or_else(|| unreachable!("a valid quota"))
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut providers: Vec<_> = self.providers.keys().map(|p| p.as_str()).collect();
        providers.sort_unstable();
        f.debug_struct("Sessions")
            .field("public_url", &self.public_url)
            .field("providers", &providers)
            .field("users", &self.users)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

/// Builds [`Sessions`]: in-memory stores, an in-memory event log and the system clock
/// unless set.
pub struct SessionsBuilder {
    tokens: Arc<AccessTokens>,
    public_url: String,
    refresh: Option<Arc<dyn RefreshStore>>,
    users: Option<Arc<dyn UserStore>>,
    flows: Option<Arc<dyn FlowStore>>,
    providers: Vec<Arc<dyn AuthProvider>>,
    return_to_allowlist: Vec<String>,
    linking: Option<LinkingPolicy>,
    events: Option<Arc<dyn EventLog>>,
    clock: Option<Arc<dyn Clock>>,
    flow_limiter: Option<Arc<dyn RateLimiter>>,
    flow_quota: Quota,
    flow_total_quota: Option<Quota>,
    facebook_secret: Option<Secret>,
    apple: Option<Arc<AppleProvider>>,
    deletions: Option<Arc<dyn DeletionStore>>,
}

impl fmt::Debug for SessionsBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionsBuilder")
            .field("public_url", &self.public_url)
            .finish_non_exhaustive()
    }
}

impl SessionsBuilder {
    /// Where refresh-token families live (default: in memory, default policy).
    pub fn refresh_store(mut self, store: Arc<dyn RefreshStore>) -> Self {
        self.refresh = Some(store);
        self
    }

    /// Where users and identities live (default: in memory).
    pub fn user_store(mut self, store: Arc<dyn UserStore>) -> Self {
        self.users = Some(store);
        self
    }

    /// Where data-deletion requests live (default: in memory).
    pub fn deletion_store(mut self, store: Arc<dyn DeletionStore>) -> Self {
        self.deletions = Some(store);
        self
    }

    /// Adds Sign in with Apple; its keys also verify Apple's server-to-server
    /// notifications ([`Sessions::apple_notification`]).
    pub fn apple(mut self, apple: Arc<AppleProvider>) -> Self {
        self.providers.push(apple.clone());
        self.apple = Some(apple);
        self
    }

    /// Where one-time flow state, login codes and used nonces live (default: in
    /// memory; use Redis when several processes serve sign-in).
    pub fn flow_store(mut self, store: Arc<dyn FlowStore>) -> Self {
        self.flows = Some(store);
        self
    }

    /// The stores [`AuthConfig::stores`](crate::config::AuthConfig::stores) chose.
    pub fn stores(mut self, stores: &crate::config::AuthStores) -> Self {
        self.refresh = Some(stores.refresh.clone());
        self.users = Some(stores.users.clone());
        self.deletions = Some(stores.deletions.clone());
        self
    }

    /// Users, refresh-token families and data-deletion requests in Postgres when `pool`
    /// is given (refresh tokens with `policy`), in memory otherwise (with the default
    /// bounds; [`stores`](Self::stores) takes the configured ones).
    #[cfg(feature = "postgres")]
    pub fn postgres(
        mut self,
        pool: Option<&upcoach_core::postgres::MeteredPool>,
        policy: RefreshPolicy,
    ) -> Self {
        let (refresh, users, deletions): (
            Arc<dyn RefreshStore>,
            Arc<dyn UserStore>,
            Arc<dyn DeletionStore>,
        ) = match pool {
            Some(pool) => (
                Arc::new(crate::refresh::PgRefreshStore::new(pool.clone()).with_policy(policy)),
                Arc::new(crate::users::PgUserStore::new(pool.clone())),
                Arc::new(crate::deletion::PgDeletionStore::new(pool.clone())),
            ),
            None => (
                Arc::new(MemoryRefreshStore::new(policy)),
                Arc::new(MemoryUserStore::new()),
                Arc::new(MemoryDeletionStore::new()),
            ),
        };
        self.refresh = Some(refresh);
        self.users = Some(users);
        self.deletions = Some(deletions);
        self
    }

    /// Flow state in Redis under `{prefix}:flow:` when `redis` is given (so any process
    /// finishes a flow another began), in memory otherwise. With Redis, the flow quota
    /// is counted there too (a `RedisLimiter` under `{prefix}:limit`, shared by every
    /// process), unless a limiter was set already ([`flow_quota`](Self::flow_quota),
    /// [`flow_limiter`](Self::flow_limiter)).
    #[cfg(feature = "redis")]
    pub fn redis(
        mut self,
        redis: Option<&upcoach_core::redis::RedisConnection>,
        prefix: &str,
    ) -> Self {
        self.flows = Some(match redis {
            Some(redis) => Arc::new(
                crate::flow::RedisFlowStore::new(redis.clone())
                    .with_prefix(format!("{prefix}:flow:")),
            ),
            None => Arc::new(MemoryFlowStore::new()),
        });
        if let (None, Some(redis)) = (&self.flow_limiter, redis) {
            self.flow_limiter = Some(Arc::new(upcoach_core::limit::RedisLimiter::new(
                redis.clone(),
                format!("{prefix}:limit"),
            )));
        }
        self
    }

    /// Adds a provider; a second one with the same [`ProviderId`] replaces the first.
    pub fn provider(mut self, provider: Arc<dyn AuthProvider>) -> Self {
        self.providers.push(provider);
        self
    }

    /// The exact URLs a web sign-in may return to (default: none).
    pub fn return_to_allowlist(mut self, urls: Vec<String>) -> Self {
        self.return_to_allowlist = urls;
        self
    }

    /// Which providers' verified addresses link accounts automatically: exactly
    /// `policy`, whatever the providers say and in whichever order the builder is
    /// called. Without it, [`LinkingPolicy::default`] with each provider's own
    /// [`AuthProvider::trusted_for_linking`] (an [`OpenIdProvider`]'s
    /// `OpenIdConfig::trusted_for_linking`, from `OIDC_<NAME>_TRUSTED_FOR_LINKING`).
    ///
    /// [`OpenIdProvider`]: crate::oidc::OpenIdProvider
    pub fn linking(mut self, policy: LinkingPolicy) -> Self {
        self.linking = Some(policy);
        self
    }

    /// Where security events go (default: an in-memory ring buffer).
    pub fn events(mut self, events: Arc<dyn EventLog>) -> Self {
        self.events = Some(events);
        self
    }

    /// The clock of every time decision (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// How many browser sign-ins one client address may start ([`FLOW_RULE`], subject
    /// `ip:<address>`), counted by `limiter` (which counts the
    /// [total](Self::flow_total_quota) too). Default: an in-process [`MemoryLimiter`]
    /// and [`DEFAULT_FLOWS_PER_ADDRESS`] per ten minutes. Give every process of a
    /// deployment one shared limiter (`RedisLimiter`), so the quota is the deployment's
    /// and not each process's.
    pub fn flow_quota(mut self, limiter: Arc<dyn RateLimiter>, quota: Quota) -> Self {
        self.flow_limiter = Some(limiter);
        self.flow_quota = quota;
        self
    }

    /// The limiter that counts the flow quotas, keeping their limits (see
    /// [`flow_quota`](Self::flow_quota)): a host's shared limiter, say.
    pub fn flow_limiter(mut self, limiter: Arc<dyn RateLimiter>) -> Self {
        self.flow_limiter = Some(limiter);
        self
    }

    /// How many browser sign-ins all clients together may start ([`FLOW_TOTAL_RULE`]):
    /// what bounds the stored flows when requests come from many addresses (a Redis
    /// flow store has no bound of its own). Default: [`DEFAULT_FLOWS_TOTAL`] per ten
    /// minutes; `None` turns it off.
    pub fn flow_total_quota(mut self, quota: Option<Quota>) -> Self {
        self.flow_total_quota = quota;
        self
    }

    /// Takes `config`'s return-to allow-list and adds each provider it configures
    /// (Google, every `OIDC_PROVIDERS` one, which carries its linking trust, Facebook), with
    /// callbacks under this builder's public URL. Nothing is fetched: each provider
    /// discovers its endpoints or keys on its first sign-in.
    pub async fn configure(mut self, config: &AuthConfig) -> Result<Self, Error> {
        let clock = self.clock.clone().unwrap_or_else(|| Arc::new(SystemClock));
        self.return_to_allowlist = config.return_to_allowlist.clone();
        if let Some(google) = &config.google {
            let callback = Sessions::callback_url_of(&self.public_url, ProviderId::GOOGLE);
            let provider = crate::google::provider(google, &callback, clock.clone())?;
            self.providers.push(Arc::new(provider));
        }
        for openid in &config.openid {
            let callback = Sessions::callback_url_of(&self.public_url, openid.name);
            let provider = crate::oidc::OpenIdProvider::new(openid, &callback, clock.clone())?;
            self.providers.push(Arc::new(provider));
        }
        if let Some(apple) = &config.apple {
            let callback = Sessions::callback_url_of(&self.public_url, ProviderId::APPLE);
            let provider = AppleProvider::new(apple, &callback, clock.clone())?;
            self = self.apple(Arc::new(provider));
        }
        if let Some(facebook) = &config.facebook {
            let callback = Sessions::callback_url_of(&self.public_url, ProviderId::FACEBOOK);
            let provider = crate::facebook::FacebookProvider::new(facebook, &callback, clock)?;
            self.providers.push(Arc::new(provider));
            self.facebook_secret = Some(facebook.app_secret.clone());
        }
        Ok(self)
    }

    /// The service.
    pub fn build(self) -> Sessions {
        let flows = self
            .flows
            .unwrap_or_else(|| Arc::new(MemoryFlowStore::new()));
        Sessions {
            refresh: self
                .refresh
                .unwrap_or_else(|| Arc::new(MemoryRefreshStore::new(RefreshPolicy::default()))),
            users: self
                .users
                .unwrap_or_else(|| Arc::new(MemoryUserStore::new())),
            web: WebSignIn::new(flows, self.return_to_allowlist),
            linking: self.linking.unwrap_or_else(|| {
                // The default, with each provider's own say (the last added of a name).
                let mut policy = LinkingPolicy::default();
                for provider in &self.providers {
                    policy = policy.with(
                        provider.id(),
                        provider
                            .trusted_for_linking()
                            .unwrap_or_else(|| LinkingPolicy::default().trusts(provider.id())),
                    );
                }
                policy
            }),
            providers: self.providers.into_iter().map(|p| (p.id(), p)).collect(),
            events: self
                .events
                .unwrap_or_else(|| Arc::new(MemoryEventLog::default())),
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            tokens: self.tokens,
            public_url: self.public_url.trim_end_matches('/').to_owned(),
            flow_quota: FlowQuota {
                limiter: self
                    .flow_limiter
                    .unwrap_or_else(|| Arc::new(MemoryLimiter::new())),
                per_address: self.flow_quota,
                total: self.flow_total_quota,
            },
            facebook_secret: self.facebook_secret,
            apple: self.apple,
            deletions: self
                .deletions
                .unwrap_or_else(|| Arc::new(MemoryDeletionStore::new())),
        }
    }
}

/// Refuses a platform that is not one of [`PLATFORMS`] (absent is fine).
///
/// ```
/// use upcoach_auth::sessions::check_platform;
///
/// assert!(check_platform(Some("ios")).is_ok() && check_platform(None).is_ok());
/// assert!(check_platform(Some("webview")).is_err());
/// assert!(check_platform(Some(&"x".repeat(16 * 1024))).is_err());
/// ```
pub fn check_platform(platform: Option<&str>) -> Result<(), AuthError> {
    match platform {
        Some(p) if !PLATFORMS.contains(&p) => Err(AuthError::InvalidPlatform),
        _ => Ok(()),
    }
}

impl Sessions {
    /// A builder for tokens signed by `tokens`, with callbacks under `public_url` (the
    /// server's origin as browsers and providers reach it: `https://api.example.com`).
    pub fn builder(tokens: Arc<AccessTokens>, public_url: impl Into<String>) -> SessionsBuilder {
        SessionsBuilder {
            tokens,
            public_url: public_url.into(),
            refresh: None,
            users: None,
            flows: None,
            providers: Vec::new(),
            return_to_allowlist: Vec::new(),
            linking: None,
            events: None,
            clock: None,
            flow_limiter: None,
            flow_quota: flows_per_ttl(DEFAULT_FLOWS_PER_ADDRESS),
            flow_total_quota: Some(flows_per_ttl(DEFAULT_FLOWS_TOTAL)),
            facebook_secret: None,
            apple: None,
            deletions: None,
        }
    }

    /// The callback URL of `provider` under `public_url`:
    /// `{public_url}/auth/{provider}/callback`, what to register with the provider.
    pub fn callback_url_of(public_url: &str, provider: ProviderId) -> String {
        format!(
            "{}/auth/{provider}/callback",
            public_url.trim_end_matches('/')
        )
    }

    /// This service's callback URL of `provider`.
    pub fn callback_url(&self, provider: ProviderId) -> String {
        Self::callback_url_of(&self.public_url, provider)
    }

    /// The server's public origin.
    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    /// Our access tokens: their issuer and verifier, and the JWK Set.
    pub fn tokens(&self) -> &Arc<AccessTokens> {
        &self.tokens
    }

    /// The user store.
    pub fn users(&self) -> &Arc<dyn UserStore> {
        &self.users
    }

    /// The refresh-token store.
    pub fn refresh_store(&self) -> &Arc<dyn RefreshStore> {
        &self.refresh
    }

    /// The configured providers.
    pub fn providers(&self) -> impl Iterator<Item = ProviderId> + '_ {
        self.providers.keys().copied()
    }

    /// The configured providers' route names (`google`, ...), sorted: what a sign-in
    /// page offers.
    pub fn provider_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.providers().map(|p| p.as_str().to_owned()).collect();
        names.sort_unstable();
        names
    }

    /// Whether the configured provider `name` comes back by a cross-site `POST`
    /// ([`AuthProvider::cross_site_callback`]); false for a name not configured.
    pub fn cross_site_callback(&self, name: &str) -> bool {
        self.provider(name)
            .is_ok_and(|provider| provider.cross_site_callback())
    }

    fn provider(&self, name: &str) -> Result<&Arc<dyn AuthProvider>, AuthError> {
        let id: ProviderId = name.parse().map_err(|_| AuthError::UnknownProvider)?;
        match self.providers.get(&id) {
            Some(provider) => Ok(provider),
            // One this crate implements, which the host did not configure.
            None if [ProviderId::GOOGLE, ProviderId::APPLE, ProviderId::FACEBOOK].contains(&id) => {
                Err(AuthError::ProviderNotConfigured(id))
            }
            None => Err(AuthError::UnknownProvider),
        }
    }

    fn record(
        &self,
        event_type: &str,
        user: Option<UserId>,
        facts: &ClientFacts,
        details: serde_json::Value,
    ) {
        let mut event = SecurityEvent::new(event_type, self.clock.as_ref())
            .details(details)
            .client(facts);
        if let Some(user) = user {
            event = event.user(user);
        }
        if let Err(e) = self.events.record(Event::Security(event)) {
            tracing::warn!(error = %e, event_type, "a security event was not logged");
        }
    }

    fn failed(&self, provider: ProviderId, facts: &ClientFacts, error: &AuthError) {
        self.record(
            "login_failed",
            None,
            facts,
            serde_json::json!({"provider": provider, "code": error.code()}),
        );
    }

    /// Tokens for `user` in session `session`, with `refresh_token`.
    fn token_response(
        &self,
        user: User,
        session: SessionId,
        refresh_token: &str,
    ) -> Result<TokenResponse, AuthError> {
        let issued = self
            .tokens
            .issue(user.id, user.roles.clone(), session)
            .map_err(AuthError::Signing)?;
        Ok(TokenResponse {
            access_token: issued.token,
            token_type: "Bearer",
            expires_in: issued.expires_in.as_secs(),
            refresh_token: refresh_token.to_owned(),
            user,
            device_id: None,
        })
    }

    /// Opens a new session (a refresh family) for `user`, bound to `device` if given.
    /// The answer does not name the device: the client presented it.
    async fn open_session(
        &self,
        user: User,
        device: Option<DeviceFingerprint>,
    ) -> Result<TokenResponse, AuthError> {
        let issued = self
            .refresh
            .open_family(user.id, device, self.clock.now())
            .await?;
        self.token_response(user, issued.family_id, issued.token.expose())
    }

    /// Opens a browser's session: bound to `device` (the browser's) if given, else to
    /// a new random id, which the answer carries as `device_id` (the only device id
    /// ever answered).
    async fn open_browser_session(
        &self,
        user: User,
        device: Option<DeviceFingerprint>,
    ) -> Result<TokenResponse, AuthError> {
        if let Some(device) = device {
            return self.open_session(user, Some(device)).await;
        }
        let made = DeviceId::generate()?;
        let mut response = self.open_session(user, Some(made.fingerprint())).await?;
        response.device_id = Some(made.expose().to_owned());
        Ok(response)
    }

    /// Admits one more stored flow for the client of `facts`: its address's quota, then
    /// the total. A limiter that cannot answer refuses (fails closed).
    async fn admit_flow(&self, facts: &ClientFacts) -> Result<(), AuthError> {
        let quota = &self.flow_quota;
        let subject = facts.ip.map_or_else(
            || UNKNOWN_ADDRESS_SUBJECT.to_owned(),
            upcoach_core::limit::ip_subject,
        );
        let decision = quota
            .limiter
            .check(FLOW_RULE, &subject, quota.per_address)
            .await
            .map_err(AuthError::FlowLimiter)?;
        if !decision.allowed {
            tracing::debug!(subject, "sign-in refused: too many flows from this address");
            return Err(AuthError::TooManySignInFlows {
                quota: quota.per_address,
                decision,
            });
        }
        if let Some(total) = quota.total {
            let decision = quota
                .limiter
                .check(FLOW_TOTAL_RULE, FLOW_TOTAL_SUBJECT, total)
                .await
                .map_err(AuthError::FlowLimiter)?;
            if !decision.allowed {
                tracing::debug!(quota = %total, "sign-in refused: too many flows in total");
                return Err(AuthError::SignInBusy {
                    quota: total,
                    decision,
                });
            }
        }
        Ok(())
    }

    /// Finds, links or creates the user of a verified identity, recording the outcome.
    async fn sign_in_identity(
        &self,
        identity: &VerifiedIdentity,
        facts: &ClientFacts,
    ) -> Result<User, AuthError> {
        match self.users.sign_in(identity, &self.linking).await {
            Ok(signed_in) => {
                self.record(
                    "login_success",
                    Some(signed_in.user.id),
                    facts,
                    serde_json::json!({
                        "provider": identity.provider,
                        "created": signed_in.created,
                        "linked": signed_in.linked,
                    }),
                );
                Ok(signed_in.user)
            }
            Err(e) => {
                let e = AuthError::from(e);
                self.failed(identity.provider, facts, &e);
                Err(e)
            }
        }
    }

    /// `GET /auth/{provider}/authorize`: starts a browser sign-in. Returns where to
    /// send the browser and the flow cookie to set on it. `return_to` must be exactly
    /// on the allow-list; `login_challenge` is the web app's S256 challenge, whose
    /// verifier it may present at [`exchange`](Self::exchange) instead of the cookie.
    ///
    /// A valid request is admitted by the flow quota before its flow is stored (see the
    /// [module docs](self)): [`AuthError::TooManySignInFlows`],
    /// [`AuthError::SignInBusy`], [`AuthError::FlowLimiter`].
    ///
    /// `device` is the browser's device, if it has one: the flow keeps its fingerprint,
    /// and a [`callback`](Self::callback) that presents no device binds to it. That is
    /// what keeps a provider that comes back by a cross-site `POST` (Sign in with Apple),
    /// where the browser sends no `SameSite=Lax` device cookie, on the browser's device.
    pub async fn authorize(
        &self,
        provider: &str,
        return_to: Option<&str>,
        login_challenge: Option<&str>,
        device: Option<&DeviceId>,
        facts: &ClientFacts,
    ) -> Result<Started, AuthError> {
        check_platform(facts.platform.as_deref())?;
        let provider = self.provider(provider)?;
        // Refuse a bad request before it counts against anyone's quota.
        self.web.check_start(return_to, login_challenge)?;
        self.admit_flow(facts).await?;
        Ok(self
            .web
            .begin(
                provider.as_ref(),
                &self.callback_url(provider.id()),
                return_to,
                facts.platform.as_deref(),
                login_challenge,
                device,
            )
            .await?)
    }

    /// `GET|POST /auth/{provider}/callback`: finishes a browser sign-in started by
    /// the browser holding `browser_cookie`. The platform recorded is the one the flow
    /// began with. Tokens answered here (no `return_to`) are bound to `device`, the
    /// browser's; without one, to the device given to [`authorize`](Self::authorize);
    /// without that either, to a new random one whose id the [`TokenResponse`] carries.
    pub async fn callback(
        &self,
        provider: &str,
        params: &CallbackParams,
        browser_cookie: Option<&str>,
        device: Option<&DeviceId>,
        facts: &ClientFacts,
    ) -> Result<CallbackOutcome, AuthError> {
        let provider = self.provider(provider)?;
        let completed = match self
            .web
            .complete(provider.as_ref(), params, browser_cookie)
            .await
        {
            Ok(completed) => completed,
            Err(e) => {
                let e = AuthError::from(e);
                self.failed(provider.id(), facts, &e);
                return Err(e);
            }
        };
        let facts = facts.clone().with_platform(completed.platform.clone());
        let user = self.sign_in_identity(&completed.identity, &facts).await?;
        match completed.return_to {
            None => {
                let device = device.map(DeviceId::fingerprint).or(completed.device);
                Ok(CallbackOutcome::SignedIn(
                    self.open_browser_session(user, device).await?,
                ))
            }
            Some(return_to) => {
                let grant = LoginGrant {
                    user_id: user.id,
                    provider: provider.id(),
                    session_id: SessionId::new(),
                    binding: completed.binding,
                };
                let code = self.web.issue_login_code(&grant).await?;
                let mut url = url::Url::parse(&return_to)
                    .map_err(|_| AuthError::SignIn(SignInError::ReturnToNotAllowed))?;
                url.query_pairs_mut().append_pair("login_code", &code);
                Ok(CallbackOutcome::Redirect(url))
            }
        }
    }

    /// `POST /auth/exchange`: the tokens of a login code, once, for the browser that
    /// began the sign-in (its flow cookie, or the verifier of its `login_challenge`).
    /// The session is bound to `device` (the browser's, or the web app's own), or to a
    /// new random one whose id the [`TokenResponse`] carries.
    pub async fn exchange(
        &self,
        login_code: &str,
        proof: &LoginProof<'_>,
        device: Option<&DeviceId>,
        facts: &ClientFacts,
    ) -> Result<TokenResponse, AuthError> {
        let grant = match self.web.redeem_login_code(login_code, proof).await {
            Ok(grant) => grant,
            Err(e) => {
                let e = AuthError::from(e);
                if matches!(e, AuthError::SignIn(SignInError::LoginCodeBrowserMismatch)) {
                    self.record(
                        "login_code_refused",
                        None,
                        facts,
                        serde_json::json!({"code": e.code()}),
                    );
                }
                return Err(e);
            }
        };
        let user = self
            .users
            .get(grant.user_id)
            .await?
            .ok_or(AuthError::UserGone {
                code: "login_code_invalid",
            })?;
        self.open_browser_session(user, device.map(DeviceId::fingerprint))
            .await
    }

    /// `POST /auth/{provider}/token`: a native app's sign-in with the provider's
    /// credential. The nonce is usable once, remembered for as long as the credential
    /// is accepted. The session is bound to `device` when the app names one; without,
    /// it is not bound.
    ///
    /// `name` is a display name the app passes along (Sign in with Apple gives the app
    /// the person's name once, on the first authorization, and never puts it in the
    /// token): used only when the provider vouched for none, and only for an account
    /// this sign-in creates. It is never an identity.
    pub async fn sign_in_with_token(
        &self,
        provider: &str,
        credential: NativeCredential,
        name: Option<String>,
        device: Option<&DeviceId>,
        facts: &ClientFacts,
    ) -> Result<TokenResponse, AuthError> {
        check_platform(facts.platform.as_deref())?;
        let provider = self.provider(provider)?;
        let mut identity = self
            .verify_native(provider.as_ref(), &credential, facts)
            .await?;
        if identity.name.is_none() {
            identity.name = name;
        }
        let user = self.sign_in_identity(&identity, facts).await?;
        self.open_session(user, device.map(DeviceId::fingerprint))
            .await
    }

    /// Verifies a native credential and claims its nonce, recording a failure.
    async fn verify_native(
        &self,
        provider: &dyn AuthProvider,
        credential: &NativeCredential,
        facts: &ClientFacts,
    ) -> Result<VerifiedIdentity, AuthError> {
        let result = async {
            // An id token without a nonce could be replayed by whoever saw it.
            if let NativeCredential::IdToken { nonce: None, .. }
            | NativeCredential::AuthorizationCode { nonce: None, .. } = credential
            {
                return Err(Error::InvalidCredential {
                    reason: "nonce_required",
                }
                .into());
            }
            let identity = provider.verify_native(credential).await?;
            if let NativeCredential::IdToken {
                id_token,
                nonce: Some(nonce),
            } = credential
            {
                // The token itself is claimed too, so a provider that does not compare
                // nonces still never takes one token twice.
                let until = identity.expires_at;
                self.claim_once(&format!("nonce:{nonce}"), until).await?;
                self.claim_once(&format!("id_token:{id_token}"), until)
                    .await?;
            }
            if let NativeCredential::AuthorizationCode {
                nonce: Some(nonce), ..
            } = credential
            {
                // The provider takes each code once; the nonce is ours to take once.
                self.claim_once(&format!("nonce:{nonce}"), identity.expires_at)
                    .await?;
            }
            Ok::<_, AuthError>(identity)
        }
        .await;
        if let Err(e) = &result {
            self.failed(provider.id(), facts, e);
        }
        result
    }

    /// Remembers `value` (hashed) until `accepted_until` (the credential's expiry and
    /// leeway), refusing one seen before. A credential that does not say when it
    /// expires, or lives longer than a value can be remembered, is refused.
    async fn claim_once(
        &self,
        value: &str,
        accepted_until: Option<SystemTime>,
    ) -> Result<(), AuthError> {
        let memory = accepted_until
            .ok_or(AuthError::CredentialLivesTooLong)?
            .duration_since(self.clock.now())
            .unwrap_or(Duration::ZERO)
            // A second more than the credential lives: never a moment without it.
            .saturating_add(Duration::from_secs(1));
        if memory > crate::flow::MAX_TTL {
            return Err(AuthError::CredentialLivesTooLong);
        }
        if self.web.claim_nonce(value, memory).await? {
            Ok(())
        } else {
            Err(AuthError::NonceReplayed)
        }
    }

    /// `POST /auth/refresh`: a new token pair for a refresh token, which is used up, sent
    /// from `device` (the `X-Device-Id` or device cookie the client presents; never
    /// answered back). A token presented again
    /// revokes its whole family (`refresh_token_reused`, and a security event); so does
    /// a token of a session bound to another device, or presented without a device id
    /// (`device_mismatch`, and a `refresh_device_mismatch` event).
    pub async fn refresh(
        &self,
        refresh_token: &str,
        device: Option<&DeviceId>,
        facts: &ClientFacts,
    ) -> Result<TokenResponse, AuthError> {
        let rotation = match self
            .refresh
            .rotate(
                refresh_token,
                device.map(DeviceId::fingerprint),
                self.clock.now(),
            )
            .await
        {
            Ok(rotation) => rotation,
            Err(e) => {
                match &e {
                    RefreshError::Reused { user_id, family_id } => self.record(
                        "refresh_token_reused",
                        Some(*user_id),
                        facts,
                        serde_json::json!({"family_id": family_id.to_string()}),
                    ),
                    // Never the token or the device id: whether one was presented.
                    RefreshError::DeviceMismatch { user_id, family_id } => self.record(
                        "refresh_device_mismatch",
                        Some(*user_id),
                        facts,
                        serde_json::json!({
                            "family_id": family_id.to_string(),
                            "device_id_presented": device.is_some(),
                        }),
                    ),
                    // A token that is not (or no longer) good: recorded without a
                    // user, so a flood of guesses is counted, not stored row by row.
                    RefreshError::Invalid | RefreshError::Expired | RefreshError::Revoked => {
                        self.record(
                            "refresh_failed",
                            None,
                            facts,
                            serde_json::json!({"code": e.code()}),
                        );
                    }
                    _ => {}
                }
                return Err(e.into());
            }
        };
        let user =
            self.user_after_rotation(rotation.user_id)
                .await?
                .ok_or(AuthError::UserGone {
                    code: "refresh_token_revoked",
                })?;
        self.record(
            "session_refreshed",
            Some(user.id),
            facts,
            serde_json::json!({"family_id": rotation.family_id.to_string()}),
        );
        self.token_response(user, rotation.family_id, rotation.token.expose())
    }

    /// The user of a rotation that is already committed: its new token exists only in
    /// the answer being made, so a 503 now would strand the family (the client would
    /// retry the old token, which is reuse, and lose the session). A store that lost
    /// its connection (a Postgres restart, a terminated backend) is asked again, on a
    /// fresh connection, up to [`ROTATION_USER_TRIES`] times, all of it within
    /// [`ROTATION_USER_BUDGET`] of the first failure: a store that is down (each read
    /// waiting out the pool's acquire timeout) does not hold the request much longer
    /// than one read would.
    async fn user_after_rotation(&self, user: UserId) -> Result<Option<User>, UserError> {
        let mut outcome = self.users.get(user).await;
        let budget_ends = tokio::time::Instant::now() + ROTATION_USER_BUDGET;
        let mut pause = Duration::from_millis(25);
        for tries in 2..=ROTATION_USER_TRIES {
            let Err(e) = &outcome else { break };
            let left = budget_ends.saturating_duration_since(tokio::time::Instant::now() + pause);
            if !e.is_retryable() || left.is_zero() {
                break;
            }
            tracing::warn!(error = %e, tries, "reading a refreshed session's user failed; trying again");
            tokio::time::sleep(pause).await;
            pause *= 4;
            match tokio::time::timeout(left, self.users.get(user)).await {
                Ok(again) => outcome = again,
                // Still the last error: the store did not answer in the time left.
                Err(_) => break,
            }
        }
        if let Err(e) = &outcome
            && e.is_retryable()
        {
            tracing::error!(error = %e, "a refresh token was rotated but its user could not be read: the client's retry will be reuse unless AUTH_REFRESH_GRACE_SECONDS covers it");
        }
        outcome
    }

    /// `POST /auth/logout`: revokes the signed-in user's session, and the family of
    /// `refresh_token` if it is one of the same user's. Another user's token is
    /// `refresh_token_not_yours`, recorded as `logout_refused`, and revokes nothing.
    pub async fn logout(
        &self,
        principal: &Principal,
        refresh_token: Option<&str>,
        facts: &ClientFacts,
    ) -> Result<(), AuthError> {
        let now = self.clock.now();
        let mut revoked = vec![principal.session_id.to_string()];
        if let Some(token) = refresh_token {
            match self
                .refresh
                .revoke_presented(token, principal.user_id, now)
                .await
            {
                Ok(Some(family)) if family.family_id != principal.session_id => {
                    revoked.push(family.family_id.to_string());
                }
                Ok(_) => {}
                Err(e) => {
                    if matches!(e, RefreshError::NotOwner) {
                        self.record(
                            "logout_refused",
                            Some(principal.user_id),
                            facts,
                            serde_json::json!({"code": e.code(), "session": principal.session_id.to_string()}),
                        );
                    }
                    return Err(e.into());
                }
            }
        }
        self.refresh
            .revoke_family(principal.session_id, RevokeReason::Logout, now)
            .await?;
        self.record(
            "logout",
            Some(principal.user_id),
            facts,
            serde_json::json!({"sessions": revoked}),
        );
        Ok(())
    }

    /// `GET /auth/me`: the signed-in user.
    pub async fn me(&self, principal: &Principal) -> Result<User, AuthError> {
        self.users
            .get(principal.user_id)
            .await?
            .ok_or(AuthError::UserGone {
                code: "unknown_user",
            })
    }

    /// `POST /auth/link/{provider}`: links the identity a native credential proves to
    /// the signed-in user.
    pub async fn link(
        &self,
        principal: &Principal,
        provider: &str,
        credential: NativeCredential,
        facts: &ClientFacts,
    ) -> Result<User, AuthError> {
        check_platform(facts.platform.as_deref())?;
        let provider = self.provider(provider)?;
        let identity = self
            .verify_native(provider.as_ref(), &credential, facts)
            .await?;
        let user = self.users.link(principal.user_id, &identity).await?;
        self.record(
            "identity_linked",
            Some(user.id),
            facts,
            serde_json::json!({"provider": provider.id()}),
        );
        Ok(user)
    }

    /// `DELETE /auth/link/{provider}`: removes the signed-in user's identity of
    /// `provider` (`last_identity` for the last way to sign in).
    pub async fn unlink(
        &self,
        principal: &Principal,
        provider: &str,
        facts: &ClientFacts,
    ) -> Result<User, AuthError> {
        let provider: ProviderId = provider.parse().map_err(|_| AuthError::UnknownProvider)?;
        let user = self.users.unlink(principal.user_id, provider).await?;
        self.record(
            "identity_unlinked",
            Some(user.id),
            facts,
            serde_json::json!({"provider": provider}),
        );
        Ok(user)
    }

    /// Facebook's deauthorize callback: the person removed this app on Facebook. Once
    /// `signed_request` verifies (HMAC-SHA256 with the app secret, constant time), the
    /// user with that Facebook identity loses every session and the identity is
    /// unlinked, unless it is their only way to sign in (then it stays, so signing in
    /// with Facebook again finds the same account). Recorded as
    /// `provider_deauthorized` (`{"provider","unlinked","sessions_revoked"}`); a refused
    /// request as `provider_notification_refused` with its code. A request must be
    /// fresh (`issued_at` within
    /// [`SIGNED_REQUEST_MAX_AGE`](crate::facebook::SIGNED_REQUEST_MAX_AGE)) and is
    /// acted on once: the same request again is answered as handled and does nothing (other requests Facebook signs with the app secret, such as the SDK's
    /// sign-in `signedRequest`, would otherwise deauthorize whoever they name).
    pub async fn facebook_deauthorized(
        &self,
        signed_request: &str,
        facts: &ClientFacts,
    ) -> Result<(), AuthError> {
        let now = self.clock.now();
        let (fresh_until, request) = self.facebook_signed_request(signed_request, facts)?;
        // Claimed before it is acted on, so no replay acts twice; a store failure after
        // the claim leaves it unhandled (the error is answered, and Facebook's retry
        // finds it claimed), which errs on the side of doing nothing.
        let memory = fresh_until
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
            .saturating_add(Duration::from_secs(1));
        if !self
            .web
            .claim_nonce(&format!("facebook-deauthorize:{signed_request}"), memory)
            .await?
        {
            return Ok(());
        }
        self.provider_revoked(ProviderId::FACEBOOK, &request.user_id, facts)
            .await
    }

    /// A verified, fresh Facebook `signed_request` and until when it stays fresh; a
    /// refusal is recorded as `provider_notification_refused` with its code.
    fn facebook_signed_request(
        &self,
        signed_request: &str,
        facts: &ClientFacts,
    ) -> Result<(SystemTime, crate::facebook::SignedRequest), AuthError> {
        let secret = self
            .facebook_secret
            .as_ref()
            .ok_or(AuthError::ProviderNotConfigured(ProviderId::FACEBOOK))?;
        let now = self.clock.now();
        crate::facebook::SignedRequest::verify(signed_request, secret)
            .and_then(|request| Ok((request.fresh_until(now)?, request)))
            .map_err(|e| {
                self.record(
                    "provider_notification_refused",
                    None,
                    facts,
                    serde_json::json!({"provider": ProviderId::FACEBOOK, "code": e.code()}),
                );
                e.into()
            })
    }

    /// `POST /auth/facebook/data-deletion`: Facebook's data-deletion callback. The
    /// `signed_request` is verified as for
    /// [`facebook_deauthorized`](Self::facebook_deauthorized) (valid, fresh); then the
    /// request is recorded (one per person for its retention: Facebook's retries get the
    /// same code), every session of that user is revoked and the Facebook identity
    /// erased, with the user when it was their only way to sign in. A repeated request
    /// acts again (the person may have signed in since) and answers the same code. Recorded as `provider_data_deletion`. The
    /// answer's confirmation code shows the request's status at
    /// [`data_deletion_status`](Self::data_deletion_status).
    pub async fn facebook_data_deletion(
        &self,
        signed_request: &str,
        facts: &ClientFacts,
    ) -> Result<DeletionRequest, AuthError> {
        let (_, request) = self.facebook_signed_request(signed_request, facts)?;
        let provider = ProviderId::FACEBOOK;
        let recorded = self
            .deletions
            .record(provider, &request.user_id, self.clock.now())
            .await?;
        // Acted on every time, even when the request was completed before: the person
        // may have signed in again since (a new account), and erasing is idempotent.
        let erased = match self
            .users
            .find_by_identity(provider, &request.user_id)
            .await?
        {
            None => None,
            Some(user) => {
                let revoked = self.refresh.revoke_user(user.id, self.clock.now()).await?;
                let erased = self
                    .users
                    .erase_identity(provider, &request.user_id)
                    .await?;
                erased.map(|erased| (erased, revoked))
            }
        };
        let outcome = if erased.is_some() {
            DeletionOutcome::IdentityRemoved
        } else {
            DeletionOutcome::NothingFound
        };
        let completed = self
            .deletions
            .complete(&recorded.code, outcome, self.clock.now())
            .await?
            .unwrap_or(recorded);
        // A request completed before keeps its first completion (and its code).
        self.record(
            "provider_data_deletion",
            erased.as_ref().map(|(erased, _)| erased.user_id),
            facts,
            serde_json::json!({
                "provider": provider,
                "confirmation_code": completed.code.as_str(),
                "known": erased.is_some(),
                "user_deleted": erased.as_ref().is_some_and(|(e, _)| e.user_deleted),
                "sessions_revoked": erased.as_ref().map_or(0, |(_, revoked)| *revoked),
            }),
        );
        Ok(completed)
    }

    /// `GET /auth/facebook/data-deletion/{code}`: the data-deletion request with this
    /// confirmation code; [`AuthError::DeletionRequestNotFound`] for a code of another
    /// shape, an unknown one, or one past its retention.
    pub async fn data_deletion_status(&self, code: &str) -> Result<DeletionRequest, AuthError> {
        let code = ConfirmationCode::parse(code).ok_or(AuthError::DeletionRequestNotFound)?;
        self.deletions
            .get(&code, self.clock.now())
            .await?
            .ok_or(AuthError::DeletionRequestNotFound)
    }

    /// `POST /auth/apple/notifications`: one of Sign in with Apple's server-to-server
    /// notifications (`{"payload": "<JWT>"}`), verified with Apple's keys
    /// ([`AppleProvider::verify_notification`]) and acted on once per `jti` (or event):
    /// `consent-revoked` and `account-delete` revoke every session of the user and
    /// unlink the Apple identity unless it is their last; `email-disabled` and
    /// `email-enabled` mark the private-relay address undeliverable or deliverable
    /// again. Each is recorded (`provider_deauthorized`, `provider_email_status`); a
    /// refused one as `provider_notification_refused`, a repeated one as
    /// [`AuthError::NotificationReplayed`]. The claim is made before acting, so a
    /// failure after it leaves the notification unhandled rather than handled twice.
    pub async fn apple_notification(
        &self,
        body: &[u8],
        facts: &ClientFacts,
    ) -> Result<(), AuthError> {
        let apple = self
            .apple
            .as_ref()
            .ok_or(AuthError::ProviderNotConfigured(ProviderId::APPLE))?;
        let provider = ProviderId::APPLE;
        let refused = |code: &str| {
            self.record(
                "provider_notification_refused",
                None,
                facts,
                serde_json::json!({"provider": provider, "code": code}),
            );
        };
        let notification = match apple.verify_notification(body).await {
            Ok(notification) => notification,
            Err(e) => {
                refused(e.code());
                return Err(e.into());
            }
        };
        if !self
            .web
            .claim_nonce(
                &format!("apple-notification:{}", notification.idempotency_key()),
                notification_memory(notification.expires_at, self.clock.unix_seconds()),
            )
            .await?
        {
            refused("notification_replayed");
            return Err(AuthError::NotificationReplayed);
        }
        let event = &notification.event;
        match event.kind {
            AppleEventKind::ConsentRevoked | AppleEventKind::AccountDelete => {
                self.provider_revoked(provider, &event.sub, facts).await
            }
            AppleEventKind::EmailDisabled | AppleEventKind::EmailEnabled => {
                let deliverable = event.kind == AppleEventKind::EmailEnabled;
                let user = self
                    .users
                    .set_email_deliverable(provider, &event.sub, deliverable)
                    .await?;
                self.record(
                    "provider_email_status",
                    user,
                    facts,
                    serde_json::json!({
                        "provider": provider,
                        "known": user.is_some(),
                        "deliverable": deliverable,
                        "event": event.kind.as_str(),
                    }),
                );
                Ok(())
            }
        }
    }

    /// What a provider's "this person left" notice does: every session of the user
    /// with that identity revoked, the identity unlinked unless it is the last.
    async fn provider_revoked(
        &self,
        provider: ProviderId,
        subject: &str,
        facts: &ClientFacts,
    ) -> Result<(), AuthError> {
        let Some(user) = self.users.find_by_identity(provider, subject).await? else {
            self.record(
                "provider_deauthorized",
                None,
                facts,
                serde_json::json!({"provider": provider, "known": false}),
            );
            return Ok(());
        };
        let revoked = self.refresh.revoke_user(user.id, self.clock.now()).await?;
        let unlinked = match self.users.unlink(user.id, provider).await {
            Ok(_) => true,
            Err(UserError::LastIdentity) => false,
            Err(e) => return Err(e.into()),
        };
        self.record(
            "provider_deauthorized",
            Some(user.id),
            facts,
            serde_json::json!({
                "provider": provider,
                "known": true,
                "unlinked": unlinked,
                "sessions_revoked": revoked,
            }),
        );
        Ok(())
    }

    /// Opens a session for `user_id` without a provider: an operator's or service
    /// account, or development tokens. A new user gets `roles`; an existing user keeps
    /// the roles it has. Recorded as `session_issued`. The session is not bound to a
    /// device.
    pub async fn issue_for(
        &self,
        user_id: UserId,
        roles: &[Role],
        facts: &ClientFacts,
    ) -> Result<TokenResponse, AuthError> {
        let user = self.users.provision(user_id, roles).await?;
        self.record(
            "session_issued",
            Some(user.id),
            facts,
            serde_json::json!({"roles": user.roles}),
        );
        self.open_session(user, None).await
    }

    /// The principal of one of our access tokens.
    ///
    /// A token verified before is answered from memory ([`TokenVerifier::verify_known`](
    /// upcoach_core::TokenVerifier::verify_known), which this service forwards to its
    /// [`AccessTokens`] as well): a check added here must be added to that one too.
    pub async fn authenticate(&self, bearer: &str) -> Result<Principal, TokenError> {
        upcoach_core::TokenVerifier::verify(self.tokens.as_ref(), bearer).await
    }

    /// Deletes expired refresh families and tokens (run it every few minutes on
    /// Postgres; [`refresh::spawn_purge`](crate::refresh::spawn_purge) does).
    pub async fn purge_expired(&self) -> Result<Purged, AuthError> {
        Ok(self.refresh.purge_expired(self.clock.now()).await?)
    }
}

#[async_trait::async_trait]
impl upcoach_core::TokenVerifier for Sessions {
    async fn verify(&self, bearer: &str) -> Result<Principal, TokenError> {
        self.authenticate(bearer).await
    }

    /// What [`authenticate`](Self::authenticate) would answer for a remembered token:
    /// the two make the same checks, and must go on doing so.
    fn verify_known(&self, bearer: &str) -> Option<Result<Principal, TokenError>> {
        upcoach_core::TokenVerifier::verify_known(self.tokens.as_ref(), bearer)
    }
}

#[cfg(test)]
mod verify_known_tests {
    use super::*;
    use upcoach_core::{ManualClock, TokenVerifier};

    /// The service's known answer is its tokens': nothing before a token verified, the
    /// principal after, `Expired` from its `exp`, each as `authenticate` says.
    #[tokio::test]
    async fn sessions_answer_a_remembered_token_as_authenticate_does() {
        let clock = Arc::new(ManualClock::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        ));
        let tokens = AccessTokens::new(
            crate::session::SigningKey::generate().unwrap(),
            clock.clone(),
        )
        .with_ttl(Duration::from_secs(60));
        let issued = tokens
            .issue(UserId::new(), vec![Role::ADMIN], SessionId::new())
            .unwrap();
        let sessions = Sessions::builder(Arc::new(tokens), "http://127.0.0.1:1").build();
        assert!(sessions.verify_known(&issued.token).is_none());
        assert_eq!(
            sessions.authenticate(&issued.token).await.unwrap(),
            issued.principal
        );
        assert_eq!(
            sessions.verify_known(&issued.token).unwrap().unwrap(),
            issued.principal
        );
        clock.advance(Duration::from_secs(60));
        assert!(matches!(
            sessions.verify_known(&issued.token),
            Some(Err(TokenError::Expired))
        ));
        assert!(matches!(
            sessions.authenticate(&issued.token).await,
            Err(TokenError::Expired)
        ));
    }
}

#[cfg(test)]
mod notification_tests {
    use super::*;

    /// A notification's key is kept until its `exp` plus the leeway and a second, and
    /// never longer than the flow store keeps anything.
    #[test]
    fn a_notification_is_remembered_until_it_expires_and_at_most_a_day() {
        let now = 1_700_000_000;
        let leeway = crate::oidc::DEFAULT_LEEWAY.as_secs();
        let memory = |exp: Option<u64>| notification_memory(exp, now).as_secs();
        assert_eq!(memory(Some(1_700_000_300)), 300 + leeway + 1);
        assert_eq!(memory(Some(1_699_999_000)), leeway + 1, "already past");
        assert_eq!(memory(Some(1_700_000_000 + 30 * 86_400)), 86_400, "capped");
        assert_eq!(memory(None), 86_400);
        assert_eq!(APPLE_NOTIFICATION_MEMORY, crate::flow::MAX_TTL);
        assert!(
            crate::apple::NOTIFICATION_MAX_AGE + crate::oidc::DEFAULT_LEEWAY
                < APPLE_NOTIFICATION_MEMORY
        );
    }
}
