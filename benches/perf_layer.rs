//! Cost of the request timing layer (route match + timer + record) beside the same
//! service without it, on one thread and with two threads recording into one route.
//!
//! `cargo bench --bench perf_layer`

use std::future::{Ready, ready};
use std::hint::black_box;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;
use upcoach_perf::{RequestMetrics, RequestTimingLayer, RouteTable};

/// A service that answers at once: what remains to measure is the layer.
#[derive(Clone)]
struct Ok200;

impl Service<Request<()>> for Ok200 {
    type Response = Response<()>;
    type Error = ();
    type Future = Ready<Result<Response<()>, ()>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        ready(Ok(Response::new(())))
    }
}

/// Calls `service` once and polls the future to completion (it never waits).
fn once<S>(service: &mut S, request: Request<()>) -> Result<Response<()>, ()>
where
    S: Service<Request<()>, Response = Response<()>, Error = ()>,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut future = std::pin::pin!(service.call(request));
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the benchmark service never waits"),
    }
}

/// The reference server's templates plus a few more, so matching is not trivial.
fn table() -> RouteTable {
    RouteTable::new([
        "/health",
        "/metrics",
        "/dev/token",
        "/auth/{provider}/authorize",
        "/auth/{provider}/callback",
        "/auth/refresh",
        "/api/dashboard/realtime/sse",
        "/api/dashboard/realtime/ws",
        "/api/dashboard/realtime/broadcast/{room}",
        "/api/dashboard/realtime/status",
        "/api/dashboard/realtime/metrics",
        "/api/analytics/security-events",
    ])
    .unwrap()
}

fn request() -> Request<()> {
    Request::get("/api/dashboard/realtime/broadcast/metrics")
        .body(())
        .unwrap()
}

fn layer_cost(c: &mut Criterion) {
    let mut group = c.benchmark_group("timing_layer");
    let mut bare = Ok200;
    group.bench_function("bare_service", |b| {
        b.iter_batched(
            request,
            |r| black_box(once(&mut bare, r)),
            criterion::BatchSize::SmallInput,
        )
    });
    let metrics = Arc::new(RequestMetrics::new(table()));
    let mut timed = RequestTimingLayer::new(metrics.clone()).layer(Ok200);
    group.bench_function("with_timing_layer", |b| {
        b.iter_batched(
            request,
            |r| black_box(once(&mut timed, r)),
            criterion::BatchSize::SmallInput,
        )
    });
    let mut off = RequestTimingLayer::disabled().layer(Ok200);
    group.bench_function("with_layer_disabled", |b| {
        b.iter_batched(
            request,
            |r| black_box(once(&mut off, r)),
            criterion::BatchSize::SmallInput,
        )
    });
    group.bench_function("std_instant_now_pair", |b| {
        b.iter(|| {
            let a = Instant::now();
            black_box(Instant::now().duration_since(a))
        })
    });
    let routes = table();
    group.bench_function("route_match_only", |b| {
        b.iter(|| {
            black_box(routes.match_path(black_box("/api/dashboard/realtime/broadcast/metrics")))
        })
    });

    // Two threads recording into the same route at once: time per request per thread.
    for (name, layered) in [
        ("bare_service_2_threads", false),
        ("with_timing_layer_2_threads", true),
    ] {
        let metrics = metrics.clone();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                std::thread::scope(|scope| {
                    let threads: Vec<_> = (0..2)
                        .map(|_| {
                            let metrics = metrics.clone();
                            scope.spawn(move || {
                                // Requests are built before the clock starts.
                                let requests: Vec<Request<()>> =
                                    (0..iters).map(|_| request()).collect();
                                let start = Instant::now();
                                if layered {
                                    let mut s = RequestTimingLayer::new(metrics).layer(Ok200);
                                    for r in requests {
                                        black_box(once(&mut s, r)).ok();
                                    }
                                } else {
                                    let mut s = Ok200;
                                    for r in requests {
                                        black_box(once(&mut s, r)).ok();
                                    }
                                }
                                start.elapsed()
                            })
                        })
                        .collect();
                    // Per request per thread: the slower thread's time over its iterations.
                    threads
                        .into_iter()
                        .map(|t| t.join().unwrap())
                        .max()
                        .unwrap()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, layer_cost);
criterion_main!(benches);
