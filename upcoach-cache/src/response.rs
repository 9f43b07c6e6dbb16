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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key of a request: path and query, the listed `Vary` header values, the user.
fn variant_key(parts: &http::request::Parts, vary: &[String], user: Option<&str>) -> String {
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
    format!(
        "http:v:{}:{path}:{}",
        user.unwrap_or("-"),
        &hex(&hasher.finalize())[..32]
    )
}

/// The key under which the `Vary` list of a resource is kept.
fn vary_key(parts: &http::request::Parts, user: Option<&str>) -> String {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    format!("http:vary:{}:{path}", user.unwrap_or("-"))
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
        let value = HeaderValue::from_bytes(&bytes[take(len)?]).ok()?;
        headers.append(name, value);
    }
    let body = bytes.slice(take(0)?.start..);
    Some((status, headers, body))
}

fn etag_of(body: &[u8]) -> HeaderValue {
    let digest = Sha256::digest(body);
    HeaderValue::from_str(&format!("\"{}\"", &hex(&digest)[..32]))
        .expect("hex is a valid header value")
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
    // Stored answers carry the ETag computed when they were stored.
    let etag = match headers.get(header::ETAG) {
        Some(etag) => etag.clone(),
        None => etag_of(&body),
    };
    headers.insert(header::ETAG, etag.clone());
    headers.insert(
        HeaderName::from_static("x-cache"),
        HeaderValue::from_static(if hit { "HIT" } else { "MISS" }),
    );
    let not_modified = if_none_match(request_headers, &etag);
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
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<CachedBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let shared = self.shared.clone();
        // The clone is ready per tower's contract only for `self.inner`; swap them.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let pass = |response: Response<ResBody>| {
                response.map(|b| b.map_err(Into::into).boxed_unsync())
            };
            let method = request.method().clone();
            let rule = (method == Method::GET || method == Method::HEAD)
                .then(|| {
                    shared
                        .rules
                        .iter()
                        .find(|r| request.uri().path().starts_with(&r.prefix))
                })
                .flatten()
                .cloned();
            let Some(rule) = rule else {
                return inner.call(request).await.map(pass);
            };
            let (parts, body) = request.into_parts();
            let no_store_request = has_directive(&parts.headers, "no-store");
            // `no-cache` on the request: revalidate, i.e. ask the origin (and store).
            let revalidate = has_directive(&parts.headers, "no-cache") || no_store_request;
            let authorized = parts.headers.contains_key(header::AUTHORIZATION);

            // Who is asking, when that decides the key.
            let user: Option<String> = match (authorized, rule.per_user, &shared.verifier) {
                (false, false, _) => None,
                (false, true, _) => Some("anonymous".to_owned()),
                (true, true, Some(verifier)) => {
                    match upcoach_core::http::authenticate(verifier.as_ref(), &parts.headers).await
                    {
                        Ok(principal) if rule.authorize.as_ref().is_none_or(|f| f(&principal)) => {
                            // Roles are part of the key: a caller whose roles changed
                            // never gets an answer computed for the old ones.
                            let mut roles: Vec<&str> =
                                principal.roles.iter().map(|r| r.as_str()).collect();
                            roles.sort_unstable();
                            Some(format!("{}+{}", principal.user_id, roles.join(",")))
                        }
                        // Not verifiable, or not allowed cached answers: the handler
                        // answers (and nothing is stored).
                        _ => {
                            return inner.call(Request::from_parts(parts, body)).await.map(pass);
                        }
                    }
                }
                // Authorization on a shared rule, or no way to verify it: never cached.
                (true, _, _) => {
                    return inner.call(Request::from_parts(parts, body)).await.map(pass);
                }
            };

            if !revalidate {
                let vary: Option<Vec<String>> = shared
                    .cache
                    .get(&vary_key(&parts, user.as_deref()))
                    .await
                    .ok()
                    .flatten()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                if let Some(vary) = vary
                    && let Ok(Some(stored)) = shared
                        .cache
                        .get(&variant_key(&parts, &vary, user.as_deref()))
                        .await
                    && let Some((status, headers, body)) = decode_response(&stored)
                {
                    return Ok(answer(&method, &parts.headers, status, headers, body, true));
                }
            }

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
            let storable = method == Method::GET
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
                    let error: Box<dyn std::error::Error + Send + Sync> = e.into();
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
                &method,
                &request_parts.headers,
                response_parts.status,
                response_parts.headers,
                bytes,
                false,
            ))
        })
    }
}
