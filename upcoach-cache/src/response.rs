//! [`ResponseCacheLayer`]: a tower layer that caches whole HTTP responses in a
//! [`TieredCache`], following these parts of RFC 9111 for a shared cache (not
//! freshness from `max-age`: entries live for their rule's TTL).
//!
//! - Only `GET` and `HEAD` requests under a rule's path prefix, and only `200` answers.
//! - `Cache-Control: no-store` or `private` on the request or the response, and
//!   `no-cache` or `max-age=0`/`s-maxage=0` on the response: not stored. A `no-store` or
//!   `no-cache` request is not answered from the cache.
//! - Only `GET` answers are stored; `HEAD` is answered from them.
//! - `Vary`: the named request headers are part of the key; `Vary: *` is never stored.
//! - A request with `Authorization`, or a response with `Set-Cookie`, is only cached by a
//!   rule keyed per user; such a hit is served only after the layer's
//!   [`TokenVerifier`] accepts the token (and the rule's `authorize`, if any, the
//!   principal); the key holds the verified user and roles.
//! - Tag versions are read before the handler runs, so an answer computed across an
//!   invalidation is never served as fresh.
//! - `ETag` is added (a digest of the body), `If-None-Match` is answered with `304`,
//!   and every answer says `X-Cache: HIT` or `MISS`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use upcoach_core::TokenVerifier;

use crate::TieredCache;

/// The header that says whether the cache answered.
const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Bodies larger than this are passed through and not stored.
pub const MAX_CACHED_BODY: usize = 1024 * 1024;

/// Decides, after the fact, whether a response may be stored.
pub type ShouldCache =
    Arc<dyn Fn(&http::request::Parts, &http::response::Parts) -> bool + Send + Sync>;

/// One rule: requests whose path starts with `prefix` are cached for `ttl` with `tags`.
#[derive(Clone)]
pub struct CacheRule {
    /// Path prefix (`/api/analytics`).
    pub prefix: String,
    /// How long an answer is kept.
    pub ttl: Duration,
    /// Tags to invalidate the answers by.
    pub tags: Vec<String>,
    /// Key answers by the verified user, which allows caching requests that carry
    /// `Authorization` and responses that set cookies.
    pub per_user: bool,
    /// An extra condition on what is stored.
    pub should_cache: Option<ShouldCache>,
    /// Who may be answered from the cache (per-user rules): a hit is served only to a
    /// verified principal this accepts; anyone else reaches the handler, which decides.
    /// Without it, every verified principal may be answered from its own entries.
    pub authorize: Option<Authorize>,
}

/// Decides whether a verified caller may be answered from the cache.
pub type Authorize = Arc<dyn Fn(&upcoach_core::Principal) -> bool + Send + Sync>;

impl std::fmt::Debug for CacheRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheRule")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .field("tags", &self.tags)
            .field("per_user", &self.per_user)
            .field("should_cache", &self.should_cache.is_some())
            .field("authorize", &self.authorize.is_some())
            .finish()
    }
}

impl CacheRule {
    /// A shared (not per-user) rule for `prefix`.
    pub fn new(prefix: impl Into<String>, ttl: Duration, tags: &[&str]) -> Self {
        Self {
            prefix: prefix.into(),
            ttl,
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            per_user: false,
            should_cache: None,
            authorize: None,
        }
    }

    /// Keys answers by the verified user.
    pub fn per_user(mut self) -> Self {
        self.per_user = true;
        self
    }

    /// Answers from the cache only callers `predicate` accepts (say, admins for an admin
    /// route: a hit skips the handler and its own checks).
    pub fn authorize(
        mut self,
        predicate: impl Fn(&upcoach_core::Principal) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.authorize = Some(Arc::new(predicate));
        self
    }

    /// Stores only responses `predicate` accepts.
    pub fn should_cache(
        mut self,
        predicate: impl Fn(&http::request::Parts, &http::response::Parts) -> bool
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.should_cache = Some(Arc::new(predicate));
        self
    }
}

pin_project_lite::pin_project! {
    /// The response body of [`ResponseCache`]: an answer's bytes (a hit, or a miss it
    /// stored), or the inner service's body `B` passed through as it is.
    pub struct CachedBody<B> {
        #[pin]
        kind: BodyKind<B>,
    }
}

pin_project_lite::pin_project! {
    #[project = BodyKindProj]
    enum BodyKind<B> {
        /// All of it at once: taken by the first poll.
        Full { bytes: Option<Bytes> },
        /// The inner service's own body.
        Passed { #[pin] body: B },
        /// The inner body failed while it was read for storing: this error, once.
        Failed { error: Option<BoxError> },
    }
}

impl<B> CachedBody<B> {
    /// A body of `bytes`, sent as one frame (none when empty).
    fn full(bytes: Bytes) -> Self {
        let bytes = (!bytes.is_empty()).then_some(bytes);
        Self {
            kind: BodyKind::Full { bytes },
        }
    }

    /// The inner service's body, passed through.
    fn passed(body: B) -> Self {
        Self {
            kind: BodyKind::Passed { body },
        }
    }

    /// A body that fails with `error`.
    fn failed(error: BoxError) -> Self {
        Self {
            kind: BodyKind::Failed { error: Some(error) },
        }
    }
}

impl<B> std::fmt::Debug for CachedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = f.debug_struct("CachedBody");
        match &self.kind {
            BodyKind::Full { bytes } => out.field("len", &bytes.as_ref().map_or(0, Bytes::len)),
            BodyKind::Passed { .. } => out.field("passed", &true),
            BodyKind::Failed { .. } => out.field("failed", &true),
        };
        out.finish()
    }
}

impl<B> http_body::Body for CachedBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            BodyKindProj::Full { bytes } => {
                Poll::Ready(bytes.take().map(|b| Ok(http_body::Frame::data(b))))
            }
            BodyKindProj::Passed { body } => body.poll_frame(cx).map_err(Into::into),
            BodyKindProj::Failed { error } => Poll::Ready(error.take().map(Err)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Full { bytes } => bytes.is_none(),
            BodyKind::Passed { body } => body.is_end_stream(),
            BodyKind::Failed { error } => error.is_none(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.kind {
            BodyKind::Full { bytes } => {
                http_body::SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            BodyKind::Passed { body } => body.size_hint(),
            BodyKind::Failed { .. } => http_body::SizeHint::default(),
        }
    }
}

/// Caches responses by rule in a [`TieredCache`]; see the module docs.
#[derive(Clone)]
pub struct ResponseCacheLayer {
    shared: Arc<Shared>,
}

#[derive(Clone)]
struct Shared {
    cache: Arc<TieredCache>,
    rules: Vec<CacheRule>,
    verifier: Option<Arc<dyn TokenVerifier>>,
}

impl std::fmt::Debug for ResponseCacheLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCacheLayer")
            .field("rules", &self.shared.rules)
            .field("verifier", &self.shared.verifier.is_some())
            .finish()
    }
}

impl ResponseCacheLayer {
    /// A layer caching into `cache` by `rules` (the first rule whose prefix matches).
    pub fn new(cache: Arc<TieredCache>, rules: Vec<CacheRule>) -> Self {
        Self {
            shared: Arc::new(Shared {
                cache,
                rules,
                verifier: None,
            }),
        }
    }

    /// Verifies bearer tokens for per-user rules. Without a verifier, requests that carry
    /// `Authorization` are never answered from the cache.
    pub fn with_verifier(mut self, verifier: Arc<dyn TokenVerifier>) -> Self {
        Arc::make_mut(&mut self.shared).verifier = Some(verifier);
        self
    }
}

impl<S> tower_layer::Layer<S> for ResponseCacheLayer {
    type Service = ResponseCache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResponseCache {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service made by [`ResponseCacheLayer`].
#[derive(Clone)]
pub struct ResponseCache<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for ResponseCache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache").finish_non_exhaustive()
    }
}

fn has_directive(headers: &HeaderMap, directive: &str) -> bool {
    headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|d| {
                d.trim()
                    .split('=')
                    .next()
                    .is_some_and(|name| name.eq_ignore_ascii_case(directive))
            })
        })
    })
}

/// `max-age=0` or `s-maxage=0` on a response: it may not be reused by a shared cache.
fn has_zero_max_age(headers: &HeaderMap) -> bool {
    headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|d| {
                let mut kv = d.trim().splitn(2, '=');
                let name = kv.next().unwrap_or_default();
                let value = kv.next().unwrap_or_default().trim().trim_matches('"');
                (name.eq_ignore_ascii_case("max-age") || name.eq_ignore_ascii_case("s-maxage"))
                    && value == "0"
            })
        })
    })
}

/// Appends `bytes` in lowercase hex to `out`.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

/// The key of one variant of a resource whose answers name `Vary` headers: the
/// resource's key ([`resource_key`]) under `http:v:`, then a digest of the listed header
/// values of this request.
fn variant_key(resource_key: &str, parts: &http::request::Parts, vary: &[String]) -> String {
    let rest = resource_key
        .strip_prefix(RESOURCE_PREFIX)
        .unwrap_or(resource_key);
    let mut key = String::with_capacity(VARIANT_PREFIX.len() + rest.len() + 33);
    key.push_str(VARIANT_PREFIX);
    key.push_str(rest);
    key.push(':');
    let mut hasher = Sha256::new();
    for name in vary {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        for value in parts.headers.get_all(name.as_str()) {
            hasher.update(value.as_bytes());
            hasher.update([1]);
        }
        hasher.update([2]);
    }
    push_hex(&mut key, &hasher.finalize()[..16]);
    key
}

/// Where a resource's entry is kept: its answer when it varies on no header, else its
/// `Vary` list (see [`Stored`]).
const RESOURCE_PREFIX: &str = "http:r:";
/// Where the variants of a resource that varies on headers are kept.
const VARIANT_PREFIX: &str = "http:v:";

/// The key of a resource for a caller: `http:r:{user}:{path and query}`, where the user
/// is `-` on a shared rule, `anonymous` on a per-user rule without `Authorization`, and else
/// [`push_user`]'s form of the verified principal.
fn resource_key(parts: &http::request::Parts, user: Caller<'_>) -> String {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut key = String::with_capacity(RESOURCE_PREFIX.len() + 80 + path.len());
    key.push_str(RESOURCE_PREFIX);
    match user {
        Caller::Shared => key.push('-'),
        Caller::Anonymous => key.push_str("anonymous"),
        Caller::Verified(principal) => push_user(&mut key, principal),
    }
    key.push(':');
    key.push_str(path);
    key
}

/// Who a cached answer is for, as its key says.
#[derive(Clone, Copy)]
enum Caller<'a> {
    /// A shared rule: everyone.
    Shared,
    /// A per-user rule, a request without `Authorization`.
    Anonymous,
    /// A per-user rule, this verified caller.
    Verified(&'a upcoach_core::Principal),
}

/// What a resource's entry holds: the first byte says which.
enum Stored {
    /// The answer (`0`, then [`encode_response`]'s form): the resource varies on no
    /// request header, so one read finds it.
    Answer(Bytes),
    /// The resource's `Vary` list (`1`, then a JSON array of lowercase names): its
    /// answers are kept per variant ([`variant_key`]).
    Vary(Vec<String>),
}

const STORED_ANSWER: u8 = 0;
const STORED_VARY: u8 = 1;

impl Stored {
    fn decode(bytes: &Bytes) -> Option<Self> {
        match *bytes.first()? {
            STORED_ANSWER => Some(Stored::Answer(bytes.slice(1..))),
            STORED_VARY => serde_json::from_slice(&bytes[1..]).ok().map(Stored::Vary),
            _ => None,
        }
    }

    fn vary(vary: &[String]) -> Bytes {
        let mut out = vec![STORED_VARY];
        // A list of strings always serializes.
        serde_json::to_writer(&mut out, vary).unwrap_or_default();
        Bytes::from(out)
    }
}

/// `[status u16][n u16]{[name len u16][name][value len u32][value]}*[body]`, after
/// `tag` when there is one.
fn encode_response(
    tag: Option<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    body: &Bytes,
) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 256);
    if let Some(tag) = tag {
        out.put_u8(tag);
    }
    out.put_u16(status.as_u16());
    out.put_u16(headers.len() as u16);
    for (name, value) in headers {
        out.put_u16(name.as_str().len() as u16);
        out.put_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value.as_bytes());
    }
    out.put_slice(body);
    out.freeze()
}

fn decode_response(bytes: &Bytes) -> Option<(StatusCode, HeaderMap, Bytes)> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<std::ops::Range<usize>> {
        let end = at.checked_add(n).filter(|e| *e <= bytes.len())?;
        let r = at..end;
        at = end;
        Some(r)
    };
    let status = StatusCode::from_u16(u16::from_be_bytes(bytes[take(2)?].try_into().ok()?)).ok()?;
    let n = u16::from_be_bytes(bytes[take(2)?].try_into().ok()?);
    // Room for the stored headers and the two `answer` adds, without growing.
    let mut headers = HeaderMap::with_capacity(usize::from(n).min(64) + 2);
    for _ in 0..n {
        let len = u16::from_be_bytes(bytes[take(2)?].try_into().ok()?) as usize;
        let name = HeaderName::from_bytes(&bytes[take(len)?]).ok()?;
        let len = u32::from_be_bytes(bytes[take(4)?].try_into().ok()?) as usize;
        // The value shares the stored bytes, as the body does: no copy.
        let value = HeaderValue::from_maybe_shared(bytes.slice(take(len)?)).ok()?;
        headers.append(name, value);
    }
    let body = bytes.slice(take(0)?.start..);
    Some((status, headers, body))
}

fn etag_of(body: &[u8]) -> HeaderValue {
    let digest = Sha256::digest(body);
    let mut etag = String::with_capacity(34);
    etag.push('"');
    push_hex(&mut etag, &digest[..16]);
    etag.push('"');
    HeaderValue::try_from(etag).expect("hex is a valid header value")
}

fn if_none_match(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let etag = etag.to_str().unwrap_or_default();
    headers.get_all(header::IF_NONE_MATCH).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|candidate| {
                let candidate = candidate.trim();
                candidate == "*" || candidate.trim_start_matches("W/") == etag
            })
        })
    })
}

/// The response to send: `304` when the client already has it, else the whole answer
/// (without a body for `HEAD`).
fn answer<B>(
    method: &Method,
    request_headers: &HeaderMap,
    status: StatusCode,
    mut headers: HeaderMap,
    body: Bytes,
    hit: bool,
) -> Response<CachedBody<B>> {
    // Stored answers carry the ETag computed when they were stored (one value).
    let etag = headers
        .entry(header::ETAG)
        .or_insert_with(|| etag_of(&body));
    let not_modified = if_none_match(request_headers, etag);
    headers.insert(
        X_CACHE,
        HeaderValue::from_static(if hit { "HIT" } else { "MISS" }),
    );
    let body = if not_modified || method == Method::HEAD {
        Bytes::new()
    } else {
        body
    };
    let mut response = Response::new(CachedBody::full(body));
    *response.status_mut() = if not_modified {
        StatusCode::NOT_MODIFIED
    } else {
        status
    };
    if not_modified {
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::CONTENT_TYPE);
    }
    *response.headers_mut() = headers;
    response
}

/// Why a body failed, as [`CachedBody`] carries it.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An answer of the inner service, unchanged but for its body type.
fn pass<B>(response: Response<B>) -> Response<CachedBody<B>> {
    response.map(CachedBody::passed)
}

impl<S, ReqBody, ResBody> tower_service::Service<Request<ReqBody>> for ResponseCache<S>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<CachedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let method = request.method();
        let rule = if method == Method::GET || method == Method::HEAD {
            let path = request.uri().path();
            self.shared
                .rules
                .iter()
                .position(|r| path.starts_with(&r.prefix))
        } else {
            None
        };
        let Some(rule) = rule else {
            // No rule: the inner service's own future, neither boxed nor waited on here.
            return ResponseFuture::Pass {
                inner: self.inner.call(request),
            };
        };
        // The clone is ready per tower's contract only for `self.inner`; swap them.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::Cached {
            future: Box::pin(lookup(self.shared.clone(), rule, inner, request)),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`ResponseCache`]: the inner service's own future when no rule
    /// applies, a boxed lookup (and, on a miss, store) otherwise.
    #[project = ResponseFutureProj]
    #[allow(missing_docs)]
    pub enum ResponseFuture<F, B, E> {
        /// No rule applies.
        Pass {
            #[pin]
            inner: F,
        },
        /// A rule applies.
        Cached {
            future: Pin<Box<dyn Future<Output = Result<Response<CachedBody<B>>, E>> + Send>>,
        },
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<CachedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Pass { inner } => inner.poll(cx).map_ok(pass),
            ResponseFutureProj::Cached { future } => future.as_mut().poll(cx),
        }
    }
}

impl Shared {
    /// The stored answer for this request, if there is one: the resource's entry (under
    /// `resource_key`), and then its variant's when it varies on headers.
    async fn stored(
        &self,
        parts: &http::request::Parts,
        resource_key: &str,
    ) -> Option<(StatusCode, HeaderMap, Bytes)> {
        // At most two reads at one await: this future's state (boxed for every request
        // under a rule) holds one cache read.
        let mut variant: Option<String> = None;
        loop {
            let key = variant.as_deref().unwrap_or(resource_key);
            let bytes = self.cache.get(key).await.ok().flatten()?;
            if variant.is_some() {
                return decode_response(&bytes);
            }
            match Stored::decode(&bytes)? {
                Stored::Answer(answer) => return decode_response(&answer),
                Stored::Vary(vary) => variant = Some(variant_key(resource_key, parts, &vary)),
            }
        }
    }
}

/// Appends the key part naming a verified caller: user id and sorted roles (a caller
/// whose roles changed never gets an answer computed for the old ones).
fn push_user(key: &mut String, principal: &upcoach_core::Principal) {
    // Sorted on the stack for the usual handful of roles.
    let mut few = [""; 8];
    let mut many = Vec::new();
    let roles: &mut [&str] = if principal.roles.len() <= few.len() {
        for (slot, role) in few.iter_mut().zip(&principal.roles) {
            *slot = role.as_str();
        }
        &mut few[..principal.roles.len()]
    } else {
        many.extend(principal.roles.iter().map(|r| r.as_str()));
        &mut many
    };
    roles.sort_unstable();
    let mut id = uuid::Uuid::encode_buffer();
    key.push_str(
        principal
            .user_id
            .as_uuid()
            .hyphenated()
            .encode_lower(&mut id),
    );
    key.push('+');
    for (i, role) in roles.iter().enumerate() {
        if i > 0 {
            key.push(',');
        }
        key.push_str(role);
    }
}

/// A request under `shared.rules[rule]`: answered from the cache when it may be, else by
/// `inner` (and stored when it may be). The miss path is a future of its own, boxed
/// only when taken, so a hit moves and keeps little.
async fn lookup<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    rule: usize,
    mut inner: S,
    request: Request<ReqBody>,
) -> Result<Response<CachedBody<ResBody>>, S::Error>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    // Most requests say nothing about caching: one look for the header.
    let cache_control = parts.headers.contains_key(header::CACHE_CONTROL);
    let no_store_request = cache_control && has_directive(&parts.headers, "no-store");
    // `no-cache` on the request: revalidate, i.e. ask the origin (and store).
    let revalidate =
        no_store_request || (cache_control && has_directive(&parts.headers, "no-cache"));
    let authorized = parts.headers.contains_key(header::AUTHORIZATION);
    let cache_rule = &shared.rules[rule];

    // Who is asking, when that decides the key.
    let principal;
    let caller = match (authorized, cache_rule.per_user, &shared.verifier) {
        (false, false, _) => Caller::Shared,
        (false, true, _) => Caller::Anonymous,
        (true, true, Some(verifier)) => {
            match upcoach_core::http::authenticate(verifier.as_ref(), &parts.headers).await {
                Ok(verified) if cache_rule.authorize.as_ref().is_none_or(|f| f(&verified)) => {
                    principal = verified;
                    Caller::Verified(&principal)
                }
                // Not verifiable, or not allowed cached answers: the handler answers
                // (and nothing is stored).
                _ => return inner.call(Request::from_parts(parts, body)).await.map(pass),
            }
        }
        // Authorization on a shared rule, or no way to verify it: never cached.
        (true, _, _) => return inner.call(Request::from_parts(parts, body)).await.map(pass),
    };

    let key = resource_key(&parts, caller);
    if !revalidate && let Some((status, headers, stored)) = shared.stored(&parts, &key).await {
        return Ok(answer(
            &parts.method,
            &parts.headers,
            status,
            headers,
            stored,
            true,
        ));
    }
    Box::pin(miss(
        shared,
        rule,
        inner,
        parts,
        body,
        key,
        no_store_request,
    ))
    .await
}

/// The miss path of [`lookup`]: the origin answers, and its answer is stored if it may
/// be.
async fn miss<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    rule: usize,
    mut inner: S,
    parts: http::request::Parts,
    body: ReqBody,
    key: String,
    no_store_request: bool,
) -> Result<Response<CachedBody<ResBody>>, S::Error>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let rule = &shared.rules[rule];
    let request_parts = parts.clone();
    // Tag versions before the handler computes the answer: an invalidation while
    // it runs makes what it computed stale at once.
    let tag_names: Vec<&str> = rule.tags.iter().map(String::as_str).collect();
    let versions = shared.cache.tag_versions(&tag_names).await;
    let response = inner.call(Request::from_parts(parts, body)).await?;
    let (response_parts, body) = response.into_parts();
    let vary: Vec<String> = response_parts
        .headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|h| h.trim().to_ascii_lowercase()))
        .filter(|h| !h.is_empty())
        .collect();
    // Only bodies of known, bounded size: a stream (SSE, say) is passed through.
    let too_large = http_body::Body::size_hint(&body)
        .exact()
        .is_none_or(|len| len > MAX_CACHED_BODY as u64);
    // Only GET answers are stored (a HEAD answer has no body to store); HEAD is
    // answered from them.
    let storable = request_parts.method == Method::GET
        && response_parts.status == StatusCode::OK
        && versions.is_some()
        && !no_store_request
        && !has_directive(&response_parts.headers, "no-cache")
        && !has_zero_max_age(&response_parts.headers)
        && !has_directive(&request_parts.headers, "private")
        && !has_directive(&response_parts.headers, "no-store")
        && !has_directive(&response_parts.headers, "private")
        && !vary.iter().any(|v| v == "*")
        && (rule.per_user || !response_parts.headers.contains_key(header::SET_COOKIE))
        && !too_large
        && rule
            .should_cache
            .as_ref()
            .is_none_or(|f| f(&request_parts, &response_parts));
    if !storable {
        let mut response = Response::from_parts(response_parts, CachedBody::passed(body));
        response
            .headers_mut()
            .insert(X_CACHE, HeaderValue::from_static("MISS"));
        return Ok(response);
    }
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            // The body failed mid-way: pass the failure on, store nothing.
            return Ok(Response::from_parts(
                response_parts,
                CachedBody::failed(e.into()),
            ));
        }
    };
    let versions = versions.unwrap_or_default();
    // The ETag is computed once, here, and stored with the answer.
    let mut response_parts = response_parts;
    response_parts.headers.insert(header::ETAG, etag_of(&bytes));
    let (status, headers) = (response_parts.status, &response_parts.headers);
    let cache = &shared.cache;
    let stored = if vary.is_empty() {
        // The answer itself under the resource's key: a hit is one read.
        let encoded = encode_response(Some(STORED_ANSWER), status, headers, &bytes);
        cache
            .set_with_versions(&key, encoded, rule.ttl, versions)
            .await
    } else {
        // The variant first, then the list that leads to it.
        let encoded = encode_response(None, status, headers, &bytes);
        let variant = variant_key(&key, &request_parts, &vary);
        cache
            .set_with_versions(&variant, encoded, rule.ttl, versions.clone())
            .await
            .and(
                cache
                    .set_with_versions(&key, Stored::vary(&vary), rule.ttl, versions)
                    .await,
            )
    };
    if let Err(e) = stored {
        tracing::debug!(error = %e, "response not cached");
    }
    Ok(answer(
        &request_parts.method,
        &request_parts.headers,
        response_parts.status,
        response_parts.headers,
        bytes,
        false,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;
    use upcoach_core::{Principal, Role, SessionId};

    /// The variant key and ETag forms as first written, with `format!` per byte: the
    /// variants of a `Vary` resource stored by an older process (in a shared L2) keep
    /// being found. (Answers that vary on nothing now live under `http:r:`, which older
    /// processes never wrote: after a deploy those start cold, never wrong.)
    fn hex_by_format(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn variant_key_by_format(
        parts: &http::request::Parts,
        vary: &[String],
        user: Option<&str>,
    ) -> String {
        let mut hasher = Sha256::new();
        for name in vary {
            hasher.update(name.as_bytes());
            hasher.update([0]);
            for value in parts.headers.get_all(name.as_str()) {
                hasher.update(value.as_bytes());
                hasher.update([1]);
            }
            hasher.update([2]);
        }
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let digest = hex_by_format(&hasher.finalize());
        format!("http:v:{}:{path}:{}", user.unwrap_or("-"), &digest[..32])
    }

    /// A stored answer's body is one frame of exactly its length, and an empty one
    /// (`HEAD`, `304`) ends at once, as `Full` would.
    #[tokio::test]
    async fn a_full_body_is_one_frame_of_its_exact_size() {
        use http_body::Body as _;
        type Body = CachedBody<http_body_util::Empty<Bytes>>;
        let body = Body::full(Bytes::from_static(b"{\"x\":1}"));
        assert_eq!(body.size_hint().exact(), Some(7));
        assert!(!body.is_end_stream());
        let mut body = std::pin::pin!(body);
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "{\"x\":1}");
        assert!(body.is_end_stream());
        assert!(
            std::future::poll_fn(|cx| body.as_mut().poll_frame(cx))
                .await
                .is_none()
        );

        let empty = Body::full(Bytes::new());
        assert_eq!(empty.size_hint().exact(), Some(0));
        assert!(empty.is_end_stream());
        assert_eq!(empty.collect().await.unwrap().to_bytes(), Bytes::new());

        // A failure read while storing is passed on once, and then the body ends.
        let mut failed = std::pin::pin!(Body::failed("reset mid-body".into()));
        assert!(!failed.is_end_stream());
        let error = std::future::poll_fn(|cx| failed.as_mut().poll_frame(cx)).await;
        assert_eq!(error.unwrap().unwrap_err().to_string(), "reset mid-body");
        assert!(failed.is_end_stream());
        assert!(
            std::future::poll_fn(|cx| failed.as_mut().poll_frame(cx))
                .await
                .is_none()
        );
    }

    #[test]
    fn stored_answers_decode_as_they_were() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.append(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("b=2"));
        headers.insert(header::ETAG, etag_of(b"{}"));
        let body = Bytes::from_static(b"{\"x\":1}");
        let stored = encode_response(None, StatusCode::OK, &headers, &body);
        let (status, decoded, decoded_body) = decode_response(&stored).unwrap();
        assert_eq!(
            (status, &decoded, decoded_body),
            (StatusCode::OK, &headers, body.clone())
        );
        assert!(decode_response(&stored.slice(..stored.len() - body.len() - 1)).is_none());
        // Under a resource's key, behind the byte that says it is an answer.
        let tagged = encode_response(Some(STORED_ANSWER), StatusCode::OK, &headers, &body);
        let Some(Stored::Answer(answer)) = Stored::decode(&tagged) else {
            panic!("not read as an answer");
        };
        assert_eq!(answer, stored);
        let vary = vec!["accept-language".to_owned(), "x-team".to_owned()];
        let Some(Stored::Vary(read)) = Stored::decode(&Stored::vary(&vary)) else {
            panic!("not read as a Vary list");
        };
        assert_eq!(read, vary);
        // An entry of another form (or none) is no answer: a miss, never a wrong one.
        for other in [&b""[..], b"[]", b"\x02\x00\xc8", b"\x01not json"] {
            assert!(
                Stored::decode(&Bytes::copy_from_slice(other)).is_none(),
                "{other:?}"
            );
        }
    }

    #[test]
    fn keys_and_etags_keep_their_form() {
        let (parts, ()) = Request::get("/api/report?window=1h")
            .header("accept-language", "fr")
            .header("accept-language", "de")
            .body(())
            .unwrap()
            .into_parts();
        let user = upcoach_core::UserId::from_uuid(uuid::Uuid::from_u128(0xa1b2 << 64 | 7));
        let admin_coach = Principal::new(
            user,
            vec![Role::COACH, Role::ADMIN],
            SessionId::new(),
            SystemTime::now(),
        );
        let callers = [
            (Caller::Shared, "-".to_owned()),
            (Caller::Anonymous, "anonymous".to_owned()),
            (
                Caller::Verified(&admin_coach),
                format!("{user}+admin,coach"),
            ),
        ];
        let vary = ["accept-language".to_owned(), "x-absent".to_owned()];
        for (caller, name) in callers {
            let key = resource_key(&parts, caller);
            assert_eq!(key, format!("http:r:{name}:/api/report?window=1h"));
            for vary in [&[][..], &vary[..1], &vary[..]] {
                assert_eq!(
                    variant_key(&key, &parts, vary),
                    variant_key_by_format(&parts, vary, Some(&name)),
                    "{vary:?} {name}"
                );
            }
        }
        // Roles in any order and number, sorted; past the stack's eight as well.
        let many: Vec<Role> = (0..12)
            .rev()
            .map(|i| format!("r{i:02}").parse::<Role>().unwrap())
            .collect();
        for roles in [
            vec![],
            vec![Role::ADMIN],
            vec![Role::USER, Role::ADMIN, Role::COACH],
            many,
        ] {
            let principal =
                Principal::new(user, roles.clone(), SessionId::new(), SystemTime::now());
            let mut names: Vec<&str> = roles.iter().map(Role::as_str).collect();
            names.sort_unstable();
            let mut key = String::new();
            push_user(&mut key, &principal);
            assert_eq!(key, format!("{user}+{}", names.join(",")));
        }
        for body in [&b""[..], b"{}", &[0xff; 300]] {
            let etag = format!("\"{}\"", &hex_by_format(&Sha256::digest(body))[..32]);
            assert_eq!(etag_of(body), etag);
        }
    }
}
