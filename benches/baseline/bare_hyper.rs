//! The raw baseline of `benches/http_load.sh`: a bare hyper 1.x HTTP/1.1 server that
//! answers every request with a fixed JSON body of the size of `/health`'s, with none of
//! upcoach in the way. Listens on `UPCOACH_ADDR` (default `127.0.0.1:8080`).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

const BODY: &[u8] = br#"{"checks":{},"status":"ok","uptime_s":12,"version":"0.1.0"}"#;

fn main() -> std::io::Result<()> {
    let addr = std::env::var("UPCOACH_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("bare hyper listening on http://{}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_req| async {
                    let mut response = hyper::Response::new(Full::new(Bytes::from_static(BODY)));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(response)
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
