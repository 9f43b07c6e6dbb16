//! A minimal HTTP/1.1 client and a server started on a free port.
// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use upcoach_server::{App, Options, ServerConfig};

pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) json: serde_json::Value,
}

/// Sends one request on a new connection.
pub(crate) async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> Answer {
    request_with(addr, method, path, body, None).await
}

/// The body of `GET path` as text.
pub(crate) async fn get_text(addr: SocketAddr, path: &str) -> String {
    let (_, _, bytes) = raw(addr, Method::GET, path, None, None).await;
    String::from_utf8(bytes.to_vec()).expect("UTF-8 body")
}

/// Sends one request, with a bearer token if given.
pub(crate) async fn request_with(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Answer {
    let (status, headers, bytes) = raw(addr, method, path, body, token).await;
    let json = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {bytes:?}"))
    };
    Answer {
        status,
        headers,
        json,
    }
}

/// A POST with `content_type` and no bearer; the answer's status and JSON.
pub(crate) async fn request_typed(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    body: &str,
) -> Answer {
    request_to_host(addr, &addr.to_string(), path, content_type, body).await
}

/// A POST to `addr` that says it is for `host`.
pub(crate) async fn request_to_host(
    addr: SocketAddr,
    host: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Answer {
    let request = Request::post(path)
        .header("host", host)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let (status, headers, bytes) = send(addr, request).await;
    Answer {
        status,
        headers,
        json: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    }
}

/// Sends one request with `headers` (a JSON body if given); the answer's status,
/// headers and JSON (`Null` when the body is empty or not JSON).
pub(crate) async fn request_headers(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Answer {
    let (status, headers, bytes) = send(addr, build(addr, method, path, body, headers)).await;
    Answer {
        status,
        headers,
        json: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    }
}

/// A request to `addr` with `headers` and, if given, a JSON body.
fn build(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .unwrap()
}

/// `GET path` with a bearer token: status, headers and raw body.
pub(crate) async fn raw_with(
    addr: SocketAddr,
    path: &str,
    token: &str,
) -> (StatusCode, HeaderMap, Bytes) {
    raw(addr, Method::GET, path, None, Some(token)).await
}

async fn raw(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (StatusCode, HeaderMap, Bytes) {
    let bearer = token.map(|token| format!("Bearer {token}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("authorization", b.as_str()))
        .collect();
    send(addr, build(addr, method, path, body, &headers)).await
}

/// Sends `request` on a new connection to `addr`: status, headers and raw body.
async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, bytes)
}

pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    pub(crate) app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Running {
    pub(crate) async fn start(config: ServerConfig, options: Options) -> Self {
        let app = App::start(config, options).await.expect("app starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(upcoach_server::serve(
            listener,
            app.service(),
            async {
                let _ = stopped.await;
            },
            app.serve_options(),
        ));
        Self {
            addr,
            app,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub(crate) async fn get(&self, path: &str) -> Answer {
        request(self.addr, Method::GET, path, None).await
    }

    pub(crate) async fn post(&self, path: &str, body: &str) -> Answer {
        request(self.addr, Method::POST, path, Some(body)).await
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

/// A WebSocket client of the server.
pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket to the server's realtime route, signed in with `token`.
pub(crate) async fn ws(server: &Running, token: &str) -> Ws {
    let url = format!(
        "ws://{}/api/dashboard/realtime/ws?access_token={token}",
        server.addr
    );
    tokio_tungstenite::connect_async(url)
        .await
        .expect("WebSocket handshake")
        .0
}

/// The next JSON text frame (pings and pongs skipped), within 10 s.
pub(crate) async fn next_json(ws: &mut Ws) -> serde_json::Value {
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("ok")
        {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
