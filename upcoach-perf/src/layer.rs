//! [`RequestTimingLayer`]: a tower layer that times every request by route template.

use quanta::Instant;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::requests::Outcome;
use crate::route::{MethodClass, RouteId};
use crate::{MatchedRoute, RequestMetrics};

/// Times each request (to its response head: a streamed body is not waited for) and
/// records method, route template, status class and latency into [`RequestMetrics`].
///
/// [`RequestTimingLayer::disabled`] is a pass-through that records nothing
/// (`PERFORMANCE_MONITORING_ENABLED=false`).
///
/// ```
/// use std::sync::Arc;
/// use upcoach_perf::{RequestMetrics, RequestTimingLayer, RouteTable};
///
/// let metrics = Arc::new(RequestMetrics::new(RouteTable::new(["/health"])?));
/// let layer = RequestTimingLayer::new(metrics.clone());
/// // tower::ServiceBuilder::new().layer(layer).service(app), or layer.layer(app)
/// # let _ = layer;
/// # Ok::<(), upcoach_perf::InvalidTemplate>(())
/// ```
///
/// # Which route
///
/// A router that knows which template it matched says so by putting a [`MatchedRoute`]
/// in the *response* extensions: the request is then recorded under the table's template
/// of exactly that text (one hash lookup, see [`RouteTable::id_of`](crate::RouteTable::id_of)),
/// or as `unmatched` if the table has no such template. Without it (a router that does
/// not set it, a service error, a request dropped before its response) the request path
/// is matched against the [`RouteTable`](crate::RouteTable), as it was when the request
/// came in.
///
/// ```
/// use std::convert::Infallible;
/// use std::sync::Arc;
/// use tower_layer::Layer;
/// use tower_service::Service;
/// use upcoach_perf::{MatchedRoute, RequestMetrics, RequestTimingLayer, RouteTable};
///
/// /// A router that answers every `/auth/...` path and says which template it used.
/// #[derive(Clone)]
/// struct Router;
///
/// impl Service<http::Request<()>> for Router {
///     type Response = http::Response<()>;
///     type Error = Infallible;
///     type Future = std::future::Ready<Result<Self::Response, Infallible>>;
///
///     fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
///         std::task::Poll::Ready(Ok(()))
///     }
///
///     fn call(&mut self, _request: http::Request<()>) -> Self::Future {
///         let mut response = http::Response::new(());
///         response.extensions_mut().insert(MatchedRoute::from_static("/auth/{provider}/token"));
///         std::future::ready(Ok(response))
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let routes = RouteTable::new(["/auth/{provider}/token", "/auth/{provider}/{step}"])?;
/// let metrics = Arc::new(RequestMetrics::new(routes));
/// let mut service = RequestTimingLayer::new(metrics.clone()).layer(Router);
/// // The path alone would match neither template; the router's word is taken.
/// let request = http::Request::post("/auth/google/token/").body(()).unwrap();
/// service.call(request).await.unwrap();
/// assert_eq!(metrics.snapshot()[0].route, "/auth/{provider}/token");
/// # Ok::<(), upcoach_perf::InvalidTemplate>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct RequestTimingLayer {
    metrics: Option<&'static RequestMetrics>,
}

impl RequestTimingLayer {
    /// A layer recording into `metrics`.
    ///
    /// The metrics then live for the rest of the process (the layer keeps one reference
    /// that it never gives back), so a request in flight never touches a reference
    /// count: that is a contended atomic on every request when threads share a route.
    /// Make one layer per server, not one per connection.
    pub fn new(metrics: Arc<RequestMetrics>) -> Self {
        let metrics: &'static Arc<RequestMetrics> = Box::leak(Box::new(metrics));
        Self {
            metrics: Some(metrics),
        }
    }

    /// A layer that records nothing.
    pub fn disabled() -> Self {
        Self { metrics: None }
    }
}

impl<S> Layer<S> for RequestTimingLayer {
    type Service = RequestTiming<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestTiming {
            inner,
            metrics: self.metrics,
        }
    }
}

/// The service made by [`RequestTimingLayer`].
#[derive(Debug, Clone)]
pub struct RequestTiming<S> {
    inner: S,
    metrics: Option<&'static RequestMetrics>,
}

impl<S, B, ResBody> Service<http::Request<B>> for RequestTiming<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TimingFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let timing = self.metrics.map(|metrics| Timing {
            route: metrics.routes().match_path(request.uri().path()),
            method: MethodClass::of(request.method()),
            metrics,
            start: Instant::now(),
        });
        TimingFuture {
            inner: self.inner.call(request),
            timing,
        }
    }
}

#[derive(Debug)]
struct Timing {
    metrics: &'static RequestMetrics,
    /// The path's match when the request came in; replaced by the response's
    /// [`MatchedRoute`] when it has one.
    route: RouteId,
    method: MethodClass,
    start: Instant,
}

pin_project! {
    /// The response future of [`RequestTiming`]. Dropped before it finishes, it records
    /// the request as `cancelled` with the time it had taken.
    #[derive(Debug)]
    pub struct TimingFuture<F> {
        #[pin]
        inner: F,
        timing: Option<Timing>,
    }

    impl<F> PinnedDrop for TimingFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(t) = this.project().timing.take() {
                t.finish(Outcome::Cancelled);
            }
        }
    }
}

impl Timing {
    #[inline]
    fn finish(self, outcome: Outcome) {
        let now = Instant::now();
        self.metrics.record(
            self.route,
            self.method,
            outcome,
            now.duration_since(self.start),
            now,
        );
    }
}

impl<F, ResBody, E> Future for TimingFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        if let Some(mut t) = this.timing.take() {
            let outcome = match &output {
                Ok(response) => {
                    // The router's own word beats the path match made at call time.
                    if let Some(matched) = response.extensions().get::<MatchedRoute>() {
                        t.route = t.metrics.routes().id_of(matched.as_str());
                    }
                    Outcome::Status(response.status().as_u16())
                }
                Err(_) => Outcome::Failed,
            };
            t.finish(outcome);
        }
        Poll::Ready(output)
    }
}
