//! What the loopback stand-ins share: a bounded HTTP/1 accept loop and JSON answers.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// hyper's read buffer: a request head past this is refused by hyper itself (431).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most connections a stand-in serves at once; more are closed at once.
const MAX_CONNECTIONS: usize = 256;
/// The content type of every JSON answer.
const JSON: &str = "application/json; charset=UTF-8";

/// A stand-in's answer.
pub(crate) type Answer = Response<Full<Bytes>>;

/// Serves `answer` on every connection `listener` accepts, until the task running it is
/// aborted (which ends every connection's task too).
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, answer: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Answer> + Send + 'static,
{
    let mut connections = JoinSet::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(MAX_HEAD_BYTES);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors or a transient error: wait instead of spinning.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_CONNECTIONS {
            continue;
        }
        let answer = answer.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let answered = answer(request);
            async move { Ok::<_, Infallible>(answered.await) }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        connections.spawn(async move {
            let _ = connection.await;
        });
    }
}

/// `body` as JSON with `status`.
pub(crate) fn json_answer(status: StatusCode, body: &Value) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from(body.to_string())));
    *answer.status_mut() = status;
    answer
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    answer
}
