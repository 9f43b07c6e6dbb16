//! The raw baseline of `benches/http_load.sh`: a bare hyper 1.x HTTP/1.1 server that
//! answers every request with a fixed JSON body of the size of `/health`'s, with none of
//! upcoach in the way. Listens on `UPCOACH_ADDR` (default `127.0.0.1:8080`).
//!
//! With `BARE_WITH_RATE_LIMIT=1` the same service sits behind upcoach's rate-limit layer
//! (the default rules, in memory, auditing into a memory log), so the script measures
//! that layer's cost on an unlimited route against the bare server in the same run.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tower_layer::Layer;
use upcoach_core::event::MemoryEventLog;
use upcoach_core::http::ClientAddr;
use upcoach_core::http::protect::{LimitConfig, RateLimitLayer};
use upcoach_core::limit::MemoryLimiter;

const BODY: &[u8] = br#"{"checks":{},"status":"ok","uptime_s":12,"version":"0.1.0"}"#;

/// Answers every request with [`BODY`]; records the peer as the reference server does.
#[derive(Clone)]
struct Health;

impl tower_service::Service<http::Request<Incoming>> for Health {
    type Response = http::Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<Incoming>) -> Self::Future {
        let mut response = http::Response::new(Full::new(Bytes::from_static(BODY)));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        ready(Ok(response))
    }
}

/// Puts the peer's address into the request, as the reference server's accept loop does.
#[derive(Clone)]
struct WithPeer<S>(S, std::net::SocketAddr);

impl<S: tower_service::Service<http::Request<Incoming>>>
    tower_service::Service<http::Request<Incoming>> for WithPeer<S>
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Incoming>) -> S::Future {
        request.extensions_mut().insert(ClientAddr(self.1));
        self.0.call(request)
    }
}

fn main() -> std::io::Result<()> {
    let addr = std::env::var("UPCOACH_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let limited = std::env::var("BARE_WITH_RATE_LIMIT").is_ok_and(|v| v == "1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let layer = RateLimitLayer::builder(Arc::new(MemoryLimiter::new()))
            .config(&LimitConfig::default())
            .events(Arc::new(MemoryEventLog::default()))
            .build()
            .map_err(std::io::Error::other)?;
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!(
            "bare hyper{} listening on http://{}",
            if limited {
                " behind the rate-limit layer"
            } else {
                ""
            },
            listener.local_addr()?
        );
        loop {
            let (stream, peer) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let io = TokioIo::new(stream);
            if limited {
                let service = TowerToHyperService::new(layer.layer(WithPeer(Health, peer)));
                tokio::spawn(http1::Builder::new().serve_connection(io, service));
            } else {
                let service = TowerToHyperService::new(Health);
                tokio::spawn(http1::Builder::new().serve_connection(io, service));
            }
        }
    })
}
