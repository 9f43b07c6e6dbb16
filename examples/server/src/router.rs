//! Routing: every route of API.md in one table, matched by `matchit`; path parameters
//! percent-decoded before any handler sees them; the matched template handed to the
//! timing layer.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use upcoach_core::http::{ApiError, HttpError, error_response};
use upcoach_perf::{MatchedRoute, UNMATCHED};

use crate::Body;
use crate::app::App;

/// What a matched route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Health,
    Metrics,
    DashboardMetrics,
    SlowQueries,
    Optimize,
    SecurityEvents,
    Invalidate,
    Websocket,
    Sse,
    Status,
    Broadcast,
    Authorize,
    Callback,
    Token,
    Exchange,
    Refresh,
    Logout,
    Me,
    Link,
    Unlink,
    FacebookDeauthorize,
    FacebookDataDeletion,
    DataDeletionStatus,
    AppleNotifications,
    Jwks,
    DevToken,
}

use Endpoint as E;

/// Every route: method, template, endpoint. `GET` routes answer `HEAD` too.
const ROUTES: &[(Method, &str, Endpoint)] = &[
    (Method::GET, "/health", E::Health),
    (Method::GET, "/metrics", E::Metrics),
    (Method::POST, "/dev/token", E::DevToken),
    (
        Method::GET,
        "/api/dashboard/realtime/metrics",
        E::DashboardMetrics,
    ),
    (Method::GET, "/api/performance/slow-queries", E::SlowQueries),
    (Method::POST, "/api/performance/optimize", E::Optimize),
    (
        Method::GET,
        "/api/analytics/security-events",
        E::SecurityEvents,
    ),
    (Method::POST, "/api/cache/invalidate", E::Invalidate),
    (Method::GET, "/api/dashboard/realtime/sse", E::Sse),
    (Method::GET, "/api/dashboard/realtime/ws", E::Websocket),
    (Method::GET, "/api/dashboard/realtime/status", E::Status),
    (
        Method::POST,
        "/api/dashboard/realtime/broadcast/{room}",
        E::Broadcast,
    ),
    (Method::GET, "/auth/{provider}/authorize", E::Authorize),
    (Method::GET, "/auth/{provider}/callback", E::Callback),
    (Method::POST, "/auth/{provider}/callback", E::Callback),
    (Method::POST, "/auth/{provider}/token", E::Token),
    (Method::POST, "/auth/exchange", E::Exchange),
    (Method::POST, "/auth/refresh", E::Refresh),
    (Method::POST, "/auth/logout", E::Logout),
    (Method::GET, "/auth/me", E::Me),
    (Method::POST, "/auth/link/{provider}", E::Link),
    (Method::DELETE, "/auth/link/{provider}", E::Unlink),
    (
        Method::POST,
        "/auth/facebook/deauthorize",
        E::FacebookDeauthorize,
    ),
    (
        Method::POST,
        "/auth/facebook/data-deletion",
        E::FacebookDataDeletion,
    ),
    (
        Method::GET,
        "/auth/facebook/data-deletion/{code}",
        E::DataDeletionStatus,
    ),
    (
        Method::POST,
        "/auth/apple/notifications",
        E::AppleNotifications,
    ),
    (Method::GET, "/.well-known/jwks.json", E::Jwks),
];

/// The templates, once each, in table order: the timing layer's route labels (with the
/// dashboard's, whose paths all go to its crate: see `route`).
pub(crate) fn templates() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = vec!["/dashboard", "/dashboard/{file}"];
    for (_, template, _) in ROUTES {
        if !out.contains(template) {
            out.push(template);
        }
    }
    out
}

/// A template's methods and endpoints.
type Methods = Vec<(Method, Endpoint)>;

static ROUTER: LazyLock<matchit::Router<(&'static str, Methods)>> = LazyLock::new(|| {
    let mut router = matchit::Router::new();
    for template in templates() {
        let methods = ROUTES
            .iter()
            .filter(|(_, t, _)| *t == template)
            .map(|(m, _, e)| (m.clone(), *e))
            .collect();
        if let Err(e) = router.insert(template, (template, methods)) {
            unreachable!("the route table is valid: {e}");
        }
    }
    router
});

/// An error answer with the server's body type.
pub(crate) fn error(e: &(impl HttpError + ?Sized)) -> Response<Body> {
    error_response::<Full<Bytes>>(e).map(BodyExt::boxed)
}

/// A JSON answer with the server's body type.
pub(crate) fn json<T: serde::Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Body> {
    upcoach_core::http::json_response::<Full<Bytes>, T>(status, value).map(BodyExt::boxed)
}

/// Any answer whose body is [`Full`].
fn boxed(response: Response<Full<Bytes>>) -> Response<Body> {
    response.map(BodyExt::boxed)
}

/// An endpoint's answer, to come.
type Answer = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// The future of [`AppService`](crate::AppService): the endpoint's answer, then its log
/// line, and its route named for the timing layer where its table would say another.
pub struct RouteFuture {
    answer: Answer,
    started: Instant,
    method: Method,
    uri: http::Uri,
    route: &'static str,
    name_route: bool,
}

impl std::fmt::Debug for RouteFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RouteFuture({})", self.route)
    }
}

impl Future for RouteFuture {
    type Output = Result<Response<Body>, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut response = std::task::ready!(self.answer.as_mut().poll(cx));
        let (method, path, status) = (&self.method, self.uri.path(), response.status());
        if status.is_server_error() {
            tracing::warn!(%method, %path, status = status.as_u16(), elapsed = ?self.started.elapsed(), "request failed");
        } else {
            tracing::debug!(%method, %path, status = status.as_u16(), elapsed = ?self.started.elapsed(), "request");
        }
        if self.name_route {
            let route = MatchedRoute::from_static(self.route);
            response.extensions_mut().insert(route);
        }
        Poll::Ready(Ok(response))
    }
}

pub(crate) fn handle(app: &Arc<App>, request: Request<Incoming>) -> RouteFuture {
    let started = Instant::now();
    let method = request.method().clone();
    // For the log line: a clone of the URI shares the request's bytes, no copy.
    let uri = request.uri().clone();
    let (route, answer) = route(app, request);
    // The timing layer records the template its table matches to the path unless the
    // answer names another; named only where this router's match differs (a 405, a
    // path the table matches in another order): an extension costs allocations.
    let table = app.perf.requests().routes();
    let name_route = table.template(table.match_path(uri.path())) != route;
    RouteFuture {
        answer,
        started,
        method,
        uri,
        route,
        name_route,
    }
}

/// The endpoint's answer to come, and the route template it answers by
/// ([`UNMATCHED`] for a 404, a 405 or an undecodable path).
fn route(app: &Arc<App>, request: Request<Incoming>) -> (&'static str, Answer) {
    let unmatched = |answer| (UNMATCHED, Box::pin(std::future::ready(answer)) as Answer);
    // Under /dashboard the page's crate answers all (404, 405), with its headers.
    let (method, path) = (request.method(), request.uri().path());
    if let Some(answer) = app.dashboard.answer(method, path, request.headers()) {
        let template = ["/dashboard/{file}", "/dashboard"][usize::from(path == "/dashboard")];
        return (template, Box::pin(std::future::ready(boxed(answer))));
    }
    let Ok(matched) = ROUTER.at(request.uri().path()) else {
        return unmatched(error(&ApiError::not_found()));
    };
    let (template, methods) = matched.value;
    let wanted = if request.method() == Method::HEAD {
        Method::GET
    } else {
        request.method().clone()
    };
    let Some(&(_, endpoint)) = methods.iter().find(|(m, _)| *m == wanted) else {
        let allowed: Vec<&str> = methods.iter().map(|(m, _)| m.as_str()).collect();
        let mut answer = error(&ApiError::method_not_allowed(&allowed.join(", ")));
        if let Ok(allow) = http::HeaderValue::from_str(&allowed.join(", ")) {
            answer.headers_mut().insert(http::header::ALLOW, allow);
        }
        return unmatched(answer);
    };
    // Path parameters are validated decoded: `public%3Anews` is `public:news`.
    let param = match matched.params.iter().next() {
        None => String::new(),
        Some((_, raw)) => match percent_encoding::percent_decode_str(raw).decode_utf8() {
            Ok(decoded) => decoded.into_owned(),
            Err(_) => {
                return unmatched(error(&ApiError::bad_request(
                    "invalid_path",
                    "a path segment is not UTF-8 once percent-decoded",
                )));
            }
        },
    };
    // Each endpoint's future is boxed on its own: `/health` (polled by load balancers)
    // moves a few hundred bytes, not the kilobytes of the largest routes' futures.
    let app = app.clone();
    let answer: Answer = match endpoint {
        E::Health => Box::pin(async move { crate::routes::health(&app).await }),
        _ => Box::pin(async move { dispatch(&app, endpoint, &param, request).await }),
    };
    (template, answer)
}

async fn dispatch(
    app: &Arc<App>,
    endpoint: Endpoint,
    param: &str,
    request: Request<Incoming>,
) -> Response<Body> {
    use crate::routes;
    let admin = matches!(
        endpoint,
        E::DashboardMetrics | E::SlowQueries | E::Optimize | E::SecurityEvents | E::Invalidate
    ) || (endpoint == E::Metrics && !app.config.metrics_public);
    if admin
        && let Err(e) =
            upcoach_core::http::require_admin(app.verifier.as_ref(), request.headers()).await
    {
        return error(&e);
    }
    match endpoint {
        E::Health => routes::health(app).await,
        E::Metrics => routes::metrics(app),
        E::DashboardMetrics => routes::dashboard_metrics(app),
        E::SlowQueries => crate::perf_routes::slow_queries(app, &request).await,
        E::Optimize => crate::perf_routes::optimize(app).await,
        E::SecurityEvents => routes::security_events(app, &request).await,
        E::Invalidate => routes::invalidate(app, request).await,
        E::Websocket => app.hub.websocket(request).await,
        E::Sse => app.hub.sse(request).await,
        E::Status | E::Broadcast => {
            let principal =
                match upcoach_core::http::authenticate(app.verifier.as_ref(), request.headers())
                    .await
                {
                    Ok(principal) => principal,
                    Err(e) => return error(&e),
                };
            match endpoint {
                E::Status => app.hub.status_route(&principal),
                _ => app.hub.publish_route(&principal, param, request).await,
            }
        }
        sign_in => self::sign_in(app, sign_in, param, request).await,
    }
}

/// The sign-in routes; without a signing key they refuse (and `/dev/token` exists
/// only with `--dev`).
async fn sign_in(
    app: &Arc<App>,
    endpoint: Endpoint,
    param: &str,
    request: Request<Incoming>,
) -> Response<Body> {
    if endpoint == E::DevToken && !app.options.dev {
        return error(&ApiError::not_found());
    }
    let Some(auth) = &app.auth else {
        return match endpoint {
            E::Jwks => json(StatusCode::OK, &serde_json::json!({"keys": []})),
            E::Me | E::Logout | E::Link | E::Unlink => error(&upcoach_core::TokenError::Invalid {
                reason: "this server issues no tokens (no signing key)",
            }),
            _ => error(&ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "signing_key_missing",
                "this server has no signing key (set AUTH_SIGNING_KEY, or start it with --dev)",
            )),
        };
    };
    boxed(match endpoint {
        E::Authorize => auth.authorize(param, request).await,
        E::Callback => auth.callback(param, request).await,
        E::Token => auth.token(param, request).await,
        E::Exchange => auth.exchange(request).await,
        E::Refresh => auth.refresh(request).await,
        E::Logout => auth.logout(request).await,
        E::Me => auth.me(request).await,
        E::Link => auth.link(param, request).await,
        E::Unlink => auth.unlink(param, request).await,
        E::FacebookDeauthorize => auth.facebook_deauthorize(request).await,
        E::FacebookDataDeletion => auth.facebook_data_deletion(request).await,
        E::DataDeletionStatus => auth.data_deletion_status(param).await,
        E::AppleNotifications => auth.apple_notifications(request).await,
        E::Jwks => auth.jwks(),
        E::DevToken => auth.dev_token(request).await,
        _ => error_response(&ApiError::not_found()),
    })
}
