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

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use sha2::{Digest, Sha256};
use upcoach_core::TokenVerifier;

use crate::TieredCache;

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

/// The response body type of [`ResponseCache`].
pub type CachedBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

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

/// The first 16 bytes of the SHA-256 of nothing, in hex: the `Vary` part of the key of
/// a resource that varies on no header (most of them), without hashing on every hit.
const NO_VARY_DIGEST: &str = "e3b0c44298fc1c149afbf4c8996fb924";

/// The key of a request: path and query, the listed `Vary` header values, the user.
fn variant_key(parts: &http::request::Parts, vary: &[String], user: Option<&str>) -> String {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let user = user.unwrap_or("-");
    let mut key = String::with_capacity(10 + user.len() + path.len() + 32);
    key.push_str("http:v:");
    key.push_str(user);
    key.push(':');
    key.push_str(path);
    key.push(':');
    if vary.is_empty() {
        key.push_str(NO_VARY_DIGEST);
        return key;
    }
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

/// The key under which the `Vary` list of a resource is kept.
fn vary_key(parts: &http::request::Parts, user: Option<&str>) -> String {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let user = user.unwrap_or("-");
    let mut key = String::with_capacity(11 + user.len() + path.len());
    for part in ["http:vary:", user, ":", path] {
        key.push_str(part);
    }
    key
}

/// `[status u16][n u16]{[name len u16][name][value len u32][value]}*[body]`.
fn encode_response(status: StatusCode, headers: &HeaderMap, body: &Bytes) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 256);
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
    let mut headers = HeaderMap::new();
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

fn full(body: Bytes) -> CachedBody {
    Full::new(body)
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// The response to send: `304` when the client already has it, else the whole answer
/// (without a body for `HEAD`).
fn answer(
    method: &Method,
    request_headers: &HeaderMap,
    status: StatusCode,
    mut headers: HeaderMap,
    body: Bytes,
    hit: bool,
) -> Response<CachedBody> {
    // Stored answers carry the ETag computed when they were stored (one value).
    let etag = headers
        .entry(header::ETAG)
        .or_insert_with(|| etag_of(&body));
    let not_modified = if_none_match(request_headers, etag);
    headers.insert(
        HeaderName::from_static("x-cache"),
        HeaderValue::from_static(if hit { "HIT" } else { "MISS" }),
    );
    let body = if not_modified || method == Method::HEAD {
        Bytes::new()
    } else {
        body
    };
    let mut response = Response::new(full(body));
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
fn pass<B>(response: Response<B>) -> Response<CachedBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    response.map(|b| b.map_err(Into::into).boxed_unsync())
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
    type Response = Response<CachedBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, S::Error>;

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
    pub enum ResponseFuture<F, E> {
        /// No rule applies.
        Pass {
            #[pin]
            inner: F,
        },
        /// A rule applies.
        Cached {
            future: Pin<Box<dyn Future<Output = Result<Response<CachedBody>, E>> + Send>>,
        },
    }
}

impl<F, E> std::fmt::Debug for ResponseFuture<F, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<F, B, E> Future for ResponseFuture<F, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<CachedBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Pass { inner } => inner.poll(cx).map_ok(pass),
            ResponseFutureProj::Cached { future } => future.as_mut().poll(cx),
        }
    }
}

impl Shared {
    /// The stored answer for this request and user, if there is one.
    async fn stored(
        &self,
        parts: &http::request::Parts,
        user: Option<&str>,
    ) -> Option<(StatusCode, HeaderMap, Bytes)> {
        // Two reads, the resource's `Vary` list and then its variant, at one await: this
        // future's state (boxed for every request under a rule) holds one cache read.
        let mut key = vary_key(parts, user);
        let mut variant = false;
        loop {
            let bytes = self.cache.get(&key).await.ok().flatten()?;
            if variant {
                return decode_response(&bytes);
            }
            let vary: Vec<String> = serde_json::from_slice(&bytes).ok()?;
            key = variant_key(parts, &vary, user);
            variant = true;
        }
    }
}

/// The key part naming a verified caller: user id and sorted roles (a caller whose
/// roles changed never gets an answer computed for the old ones).
fn user_key(principal: &upcoach_core::Principal) -> String {
    let mut roles: Vec<&str> = principal.roles.iter().map(|r| r.as_str()).collect();
    roles.sort_unstable();
    let mut key = String::with_capacity(64);
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
    key
}

/// A request under `shared.rules[rule]`: answered from the cache when it may be, else by
/// `inner` (and stored when it may be). The miss path is a future of its own, boxed
/// only when taken, so a hit moves and keeps little.
async fn lookup<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    rule: usize,
    mut inner: S,
    request: Request<ReqBody>,
) -> Result<Response<CachedBody>, S::Error>
where
    S: tower_service::Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    let no_store_request = has_directive(&parts.headers, "no-store");
    // `no-cache` on the request: revalidate, i.e. ask the origin (and store).
    let revalidate = has_directive(&parts.headers, "no-cache") || no_store_request;
    let authorized = parts.headers.contains_key(header::AUTHORIZATION);
    let cache_rule = &shared.rules[rule];

    // Who is asking, when that decides the key.
    let user: Option<String> = match (authorized, cache_rule.per_user, &shared.verifier) {
        (false, false, _) => None,
        (false, true, _) => Some("anonymous".to_owned()),
        (true, true, Some(verifier)) => {
            match upcoach_core::http::authenticate(verifier.as_ref(), &parts.headers).await {
                Ok(principal) if cache_rule.authorize.as_ref().is_none_or(|f| f(&principal)) => {
                    Some(user_key(&principal))
                }
                // Not verifiable, or not allowed cached answers: the handler answers
                // (and nothing is stored).
                _ => return inner.call(Request::from_parts(parts, body)).await.map(pass),
            }
        }
        // Authorization on a shared rule, or no way to verify it: never cached.
        (true, _, _) => return inner.call(Request::from_parts(parts, body)).await.map(pass),
    };

    if !revalidate
        && let Some((status, headers, stored)) = shared.stored(&parts, user.as_deref()).await
    {
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
        user,
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
    user: Option<String>,
    no_store_request: bool,
) -> Result<Response<CachedBody>, S::Error>
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
        let mut response =
            Response::from_parts(response_parts, body.map_err(Into::into).boxed_unsync());
        response.headers_mut().insert(
            HeaderName::from_static("x-cache"),
            HeaderValue::from_static("MISS"),
        );
        return Ok(response);
    }
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            // The body failed mid-way: pass the failure on, store nothing.
            let error: BoxError = e.into();
            let frames = futures_util::stream::once(std::future::ready(Err(error)));
            let failing = http_body_util::StreamBody::new(frames);
            return Ok(Response::from_parts(response_parts, failing.boxed_unsync()));
        }
    };
    let user = user.as_deref();
    let versions = versions.unwrap_or_default();
    // The ETag is computed once, here, and stored with the answer.
    let mut response_parts = response_parts;
    response_parts.headers.insert(header::ETAG, etag_of(&bytes));
    let encoded = encode_response(response_parts.status, &response_parts.headers, &bytes);
    let stored = shared
        .cache
        .set_with_versions(
            &variant_key(&request_parts, &vary, user),
            encoded,
            rule.ttl,
            versions.clone(),
        )
        .await
        .and(
            shared
                .cache
                .set_with_versions(
                    &vary_key(&request_parts, user),
                    Bytes::from(serde_json::to_vec(&vary).unwrap_or_default()),
                    rule.ttl,
                    versions,
                )
                .await,
        );
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

    /// The key and ETag forms as first written, with `format!` per byte: entries stored
    /// by an older process (in a shared L2) keep being found.
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
        let stored = encode_response(StatusCode::OK, &headers, &body);
        let (status, decoded, decoded_body) = decode_response(&stored).unwrap();
        assert_eq!(
            (status, &decoded, decoded_body),
            (StatusCode::OK, &headers, body.clone())
        );
        assert!(decode_response(&stored.slice(..stored.len() - body.len() - 1)).is_none());
    }

    #[test]
    fn keys_and_etags_keep_their_form() {
        let (parts, ()) = Request::get("/api/report?window=1h")
            .header("accept-language", "fr")
            .header("accept-language", "de")
            .body(())
            .unwrap()
            .into_parts();
        let vary = ["accept-language".to_owned(), "x-absent".to_owned()];
        for vary in [&[][..], &vary[..1], &vary[..]] {
            for user in [None, Some("anonymous"), Some("42+admin,coach")] {
                assert_eq!(
                    variant_key(&parts, vary, user),
                    variant_key_by_format(&parts, vary, user),
                    "{vary:?} {user:?}"
                );
            }
        }
        assert_eq!(
            vary_key(&parts, Some("u")),
            "http:vary:u:/api/report?window=1h"
        );
        assert_eq!(vary_key(&parts, None), "http:vary:-:/api/report?window=1h");
        let user = upcoach_core::UserId::from_uuid(uuid::Uuid::from_u128(0xa1b2 << 64 | 7));
        for roles in [
            vec![],
            vec![Role::ADMIN],
            vec![Role::USER, Role::ADMIN, Role::COACH],
        ] {
            let principal =
                Principal::new(user, roles.clone(), SessionId::new(), SystemTime::now());
            let mut names: Vec<&str> = roles.iter().map(Role::as_str).collect();
            names.sort_unstable();
            assert_eq!(user_key(&principal), format!("{user}+{}", names.join(",")));
        }
        for body in [&b""[..], b"{}", &[0xff; 300]] {
            let etag = format!("\"{}\"", &hex_by_format(&Sha256::digest(body))[..32]);
            assert_eq!(etag_of(body), etag);
        }
    }
}
