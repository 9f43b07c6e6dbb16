//! Cost of the rate-limit layer in front of a service that answers at once, beside the
//! same service without it, in the same run:
//!
//! - `health`: a route no rule matches (`GET /health`): the layer's fixed cost
//!   (client resolution, the audit facts it keeps, one failed route match).
//! - `refresh`: a limited route (`POST /auth/refresh`), one in-memory GCRA check per
//!   request, from 50,000 addresses in turn so none is refused (each stays well under
//!   its 60 a minute, and under the limiter's 100,000-key cap).
//!
//! `cargo bench --bench protect` prints the layer's added cost per call; the goal for
//! `/health` (≥ 0.95× bare requests/s) is measured end to end by `benches/http_load.sh`.

#[allow(dead_code, reason = "this bench needs ready() only")]
mod common;

use std::convert::Infallible;
use std::future::{Ready, ready as done};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{Method, Request, Response};
use tower_layer::Layer;
use tower_service::Service;
use upcoach_core::event::MemoryEventLog;
use upcoach_core::http::ClientAddr;
use upcoach_core::http::protect::{LimitConfig, RateLimitLayer};
use upcoach_core::limit::MemoryLimiter;

/// A service that answers at once: what remains to measure is the layer.
#[derive(Clone)]
struct Ok200;

impl Service<Request<()>> for Ok200 {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        done(Ok(Response::new(())))
    }
}

fn request(method: Method, path: &str, n: u32) -> Request<()> {
    let mut r = Request::builder()
        .method(method)
        .uri(path)
        .header("user-agent", "bench/1.0")
        .body(())
        .unwrap();
    let ip = IpAddr::V4(Ipv4Addr::from(0x0A00_0000 | (n % 50_000)));
    r.extensions_mut()
        .insert(ClientAddr(SocketAddr::new(ip, 40000)));
    r
}

fn layer() -> RateLimitLayer {
    RateLimitLayer::builder(Arc::new(MemoryLimiter::new()))
        .config(&LimitConfig::default())
        .events(Arc::new(MemoryEventLog::new(1024)))
        .build()
        .unwrap()
}

/// Mean time per call of `service` over `n` requests made by `make` (built before the
/// clock starts).
fn time_per_call<S>(service: &mut S, n: u32, make: impl Fn(u32) -> Request<()>) -> Duration
where
    S: Service<Request<()>>,
{
    let requests: Vec<_> = (0..n).map(make).collect();
    let start = Instant::now();
    for r in requests {
        let _ = black_box(common::ready(service.call(r)));
    }
    start.elapsed() / n
}

fn layer_cost(c: &mut Criterion) {
    let mut group = c.benchmark_group("rate_limit_layer");
    let health = |n| request(Method::GET, "/health", n);
    let refresh = |n| request(Method::POST, "/auth/refresh", n);
    let mut bare = Ok200;
    group.bench_function("health_bare", |b| {
        b.iter_batched(
            || health(1),
            |r| black_box(common::ready(bare.call(r))),
            criterion::BatchSize::SmallInput,
        )
    });
    let mut limited = layer().layer(Ok200);
    group.bench_function("health_through_layer", |b| {
        b.iter_batched(
            || health(1),
            |r| black_box(common::ready(limited.call(r))),
            criterion::BatchSize::SmallInput,
        )
    });
    let mut counter = 0u32;
    group.bench_function("refresh_through_layer", |b| {
        b.iter_batched(
            || {
                counter = counter.wrapping_add(1);
                refresh(counter)
            },
            |r| black_box(common::ready(limited.call(r))),
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();

    // The ratios, from one interleaved run: bare and layered alternate five times.
    let (mut bare_t, mut health_t, mut refresh_t) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for round in 0..5u32 {
        bare_t += time_per_call(&mut Ok200, 200_000, health);
        health_t += time_per_call(&mut layer().layer(Ok200), 200_000, health);
        refresh_t += time_per_call(&mut layer().layer(Ok200), 200_000, |n| {
            refresh(n + round * 200_000)
        });
    }
    println!(
        "\nrate-limit layer, mean per call: bare {:?}, /health through the layer {:?} \
         (+{:?}), /auth/refresh with a check {:?}. End to end, the goal (>= 0.95x of bare \
         requests/s on /health) is measured by benches/http_load.sh (bare hyper with and \
         without the layer).",
        bare_t / 5,
        health_t / 5,
        health_t.saturating_sub(bare_t) / 5,
        refresh_t / 5,
    );
}

criterion_group!(benches, layer_cost);
criterion_main!(benches);
