//! The accept loop (`upcoach_core::http::serve`) hands a connection to the response that
//! asked for it, once the head is written: the response then writes the body itself, the
//! connection keeps its place under the caps until that writer drops it, and a response
//! that asked but was not the one answered leaves the connection to HTTP.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use upcoach_core::http::serve::{ServeOptions, serve};
use upcoach_core::http::{ConnectionHandoff, ConnectionLimits, HandedOff};

const WAIT: Duration = Duration::from_secs(10);

type Body = BoxBody<Bytes, Infallible>;

struct Server {
    addr: SocketAddr,
    /// Connections handed over by `/take`.
    taken: mpsc::Receiver<HandedOff>,
    /// Said by `/ask-only` once its ask came to nothing.
    unanswered: mpsc::Receiver<()>,
}

/// Serves: `/take` takes its connection and hands it to the test; `/ask-only` asks for
/// it but answers an ordinary keep-alive response; anything else gets `ok`.
async fn server(limits: Option<ConnectionLimits>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (taken_tx, taken) = mpsc::channel(4);
    let (unanswered_tx, unanswered) = mpsc::channel(4);
    let service =
        hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let taken = taken_tx.clone();
            let unanswered = unanswered_tx.clone();
            async move {
                let offer = request.extensions().get::<ConnectionHandoff>().cloned();
                let offer = offer.expect("the accept loop offers every connection");
                let response: http::Response<Body> = match request.uri().path() {
                    "/take" => {
                        let (response, connection) =
                            offer.respond().expect("the first ask of its connection");
                        tokio::spawn(async move {
                            if let Ok(io) = connection.await {
                                let _ = taken.send(io).await;
                            }
                        });
                        let mut response = response.map(BodyExt::boxed);
                        response.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("text/event-stream"),
                        );
                        response
                    }
                    "/ask-only" => {
                        // Asked, but a plain answer goes out instead (as when a layer
                        // replaces the response).
                        let (_unsent, connection) =
                            offer.respond().expect("the first ask of its connection");
                        tokio::spawn(async move {
                            match connection.await {
                                Err(_) => {
                                    let _ = unanswered.send(()).await;
                                }
                                // Wrong: reported, so the test sees it.
                                Ok(io) => {
                                    let _ = taken.send(io).await;
                                }
                            }
                        });
                        http::Response::new(Full::from("asked").boxed())
                    }
                    _ => http::Response::new(Full::from("ok").boxed()),
                };
                Ok::<_, Infallible>(response)
            }
        });
    let options = ServeOptions {
        limits,
        ..ServeOptions::default()
    };
    tokio::spawn(serve(listener, service, std::future::pending(), options));
    Server {
        addr,
        taken,
        unanswered,
    }
}

/// Reads until `text` has arrived (or the connection ends); everything read so far.
async fn read_until(stream: &mut TcpStream, text: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains(text) {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => panic!("nothing more within {WAIT:?}; so far {seen:?}"),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

async fn get(stream: &mut TcpStream, path: &str) {
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
}

/// Sends `request` on `client` and waits for the connection it hands over.
async fn taken(server: &mut Server, client: &mut TcpStream, request: &[u8]) -> HandedOff {
    client.write_all(request).await.unwrap();
    tokio::time::timeout(WAIT, server.taken.recv())
        .await
        .unwrap()
        .expect("handed over")
}

const TAKE: &[u8] = b"GET /take HTTP/1.1\r\nhost: test\r\n\r\n";

async fn ends(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(WAIT, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn the_asker_writes_the_body_after_the_head_until_it_drops_the_connection() {
    let mut server = server(None).await;
    let mut client = TcpStream::connect(server.addr).await.unwrap();
    let mut io = taken(&mut server, &mut client, TAKE).await;
    io.write_all(b"data: one\n\n").await.unwrap();
    let seen = read_until(&mut client, "data: one\n\n").await;
    let (head, body) = seen.split_once("\r\n\r\n").expect("a head, then the body");
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("connection: close"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(
        !head.contains("content-length") && !head.contains("transfer-encoding"),
        "the body runs until the close: {head}"
    );
    assert_eq!(
        body, "data: one\n\n",
        "the server wrote nothing after the head"
    );
    io.write_all(b"data: two\n\n").await.unwrap();
    assert_eq!(read_until(&mut client, "two").await, "data: two\n\n");
    drop(io);
    assert!(ends(&mut client).await, "dropping it closes the connection");
}

#[tokio::test]
async fn a_handed_over_connection_keeps_its_place_under_the_caps_until_dropped() {
    let mut server = server(Some(ConnectionLimits::new(10, 1))).await;
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    let io = taken(&mut server, &mut first, TAKE).await;
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    get(&mut second, "/").await;
    let refused = read_until(&mut second, "\r\n\r\n").await;
    assert!(
        refused.starts_with("HTTP/1.1 429"),
        "one connection per address, and the handed-over one holds it: {refused}"
    );
    read_until(&mut first, "\r\n\r\n").await;
    drop(io);
    assert!(ends(&mut first).await);
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    get(&mut third, "/").await;
    let answer = read_until(&mut third, "ok").await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the place came back: {answer}"
    );
}

#[tokio::test]
async fn an_ask_whose_response_is_not_the_one_answered_leaves_the_connection_to_http() {
    let mut server = server(None).await;
    let mut client = TcpStream::connect(server.addr).await.unwrap();
    get(&mut client, "/ask-only").await;
    let first = read_until(&mut client, "asked").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    tokio::time::timeout(WAIT, server.unanswered.recv())
        .await
        .expect("the asker hears at once that nothing comes")
        .unwrap();
    get(&mut client, "/").await;
    let second = read_until(&mut client, "ok").await;
    assert!(
        second.starts_with("HTTP/1.1 200"),
        "the same connection answers its next request: {second}"
    );
    drop(client);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(server.taken.try_recv().is_err(), "nothing was handed over");
}

#[tokio::test]
async fn an_http_1_0_request_is_handed_over_too() {
    let mut server = server(None).await;
    let mut client = TcpStream::connect(server.addr).await.unwrap();
    let mut io = taken(
        &mut server,
        &mut client,
        b"GET /take HTTP/1.0\r\nhost: test\r\n\r\n",
    )
    .await;
    io.write_all(b"data: one\n\n").await.unwrap();
    let seen = read_until(&mut client, "data: one\n\n").await;
    assert!(seen.starts_with("HTTP/1.0 200 OK\r\n"), "{seen}");
    assert!(seen.ends_with("\r\n\r\ndata: one\n\n"), "{seen}");
}

#[tokio::test]
async fn a_request_pipelined_behind_the_taking_one_is_not_answered_by_http() {
    let mut server = server(None).await;
    let mut client = TcpStream::connect(server.addr).await.unwrap();
    let mut io = taken(
        &mut server,
        &mut client,
        b"GET /take HTTP/1.1\r\nhost: test\r\n\r\nGET / HTTP/1.1\r\nhost: test\r\n\r\n",
    )
    .await;
    io.write_all(b"data: one\n\n").await.unwrap();
    drop(io);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, client.read_to_end(&mut rest)).await;
    let seen = String::from_utf8_lossy(&rest);
    assert_eq!(
        seen.matches("HTTP/1.").count(),
        1,
        "one response, the taking one's head, then its body: {seen}"
    );
    assert!(seen.ends_with("data: one\n\n"), "{seen}");
}
