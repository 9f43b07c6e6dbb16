//! The accept loop's header deadline (`ServeOptions::header_read_timeout`): it holds
//! for every request of a kept-alive connection, is set anew after each answer, and
//! closes a connection that sends no (complete) request head in time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http::Response;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use upcoach_server::{Body, ServeOptions};

const DEADLINE: Duration = Duration::from_secs(2);

/// A server answering `{}` to everything, with a header deadline of [`DEADLINE`].
async fn start() -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = hyper::service::service_fn(|_req| async {
        Ok::<_, Infallible>(Response::new(
            http_body_util::Full::new(bytes::Bytes::from_static(b"{}")).boxed(),
        ) as Response<Body>)
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = ServeOptions {
        header_read_timeout: DEADLINE,
        ..ServeOptions::default()
    };
    tokio::spawn(upcoach_server::serve(
        listener,
        answer,
        async {
            let _ = stopped.await;
        },
        options,
    ));
    (addr, stop)
}

/// Sends one request and reads its whole answer (`{}`, two bytes of body).
async fn get(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"\r\n\r\n{}") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed mid-answer: {answer:?}");
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(answer).unwrap()
}

/// Reads until the server closes the connection; what it sent meanwhile.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut rest))
        .await
        .expect("the server closes the connection")
        .unwrap_or_default();
    rest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_of_a_kept_alive_connection_gets_a_fresh_deadline() {
    let (addr, _stop) = start().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // Three requests, each sent 60 % of the deadline after the answer before it: the
    // third comes after the first deadline, so each wait must have had its own.
    for _ in 0..3 {
        assert!(get(&mut stream).await.starts_with("HTTP/1.1 200 OK"));
        tokio::time::sleep(DEADLINE * 6 / 10).await;
    }
    assert!(get(&mut stream).await.starts_with("HTTP/1.1 200 OK"));
    // Then no request: the deadline closes the connection.
    let rest = until_closed(&mut stream).await;
    assert!(
        rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"),
        "{rest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_that_never_ends_closes_its_connection() {
    let (addr, _stop) = start().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    assert!(get(&mut stream).await.starts_with("HTTP/1.1 200 OK"));
    // A head trickled in and never finished, on a connection that has served before.
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let rest = until_closed(&mut stream).await;
    assert!(
        rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"),
        "no answer to an unfinished head: {rest:?}"
    );

    // On a fresh connection, the first head is held to the deadline too.
    let mut fresh = TcpStream::connect(addr).await.unwrap();
    fresh.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let rest = until_closed(&mut fresh).await;
    assert!(
        rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"),
        "{rest:?}"
    );
}
