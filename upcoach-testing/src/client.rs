//! One HTTP/1.1 request to a server on loopback (a stand-in, an example server), for
//! tests: a new connection each time, no redirect followed, nothing kept.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

/// What a server answered.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Answer {
    /// The `Content-Type`, empty when there is none.
    pub fn content_type(&self) -> &str {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// The body as JSON, `Null` when it is empty or not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// Sends `method` to `url` (http only) with `headers` and `body`, and reads the answer.
///
/// # Panics
///
/// When the server cannot be reached or the exchange fails (a failed test).
pub async fn send(
    method: http::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Answer {
    let url = url::Url::parse(url).expect("a URL");
    let host = url.host_str().expect("a host");
    let port = url.port_or_known_default().expect("a port");
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .expect("the server listens");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("an HTTP/1.1 connection");
    tokio::spawn(connection);
    let target = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    let mut request = http::Request::builder()
        .method(method)
        .uri(target)
        .header(http::header::HOST, format!("{host}:{port}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .expect("a valid request");
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        sender.send_request(request),
    )
    .await
    .expect("the answer comes within 5 s")
    .expect("an answer");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the whole body").to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}
