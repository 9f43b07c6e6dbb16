//! Graceful shutdown: in-flight requests finish, new connections are refused, and the
//! real binary exits cleanly on SIGTERM.

mod support;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use upcoach_server::{Body, ServeOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_finish_after_shutdown_starts() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let slow = hyper::service::service_fn(|_req| async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        Ok::<_, Infallible>(Response::new(
            http_body_util::Full::new(bytes::Bytes::from_static(br#"{"done":true}"#)).boxed(),
        ) as Response<Body>)
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(upcoach_server::serve(
        listener,
        slow,
        async {
            let _ = stopped.await;
        },
        ServeOptions::default(),
    ));

    let in_flight = tokio::spawn(support::request(addr, Method::GET, "/slow", None));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let _ = stop.send(());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connections once shutdown starts"
    );

    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.json["done"], true,
        "the in-flight request got its whole answer"
    );
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns once drained")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_drain_timeout_is_cut_and_serve_returns() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stuck = hyper::service::service_fn(|_req| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, Infallible>(Response::new(http_body_util::Empty::new().boxed()) as Response<Body>)
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = ServeOptions {
        drain_timeout: Duration::from_millis(200),
        ..ServeOptions::default()
    };
    let server = tokio::spawn(upcoach_server::serve(
        listener,
        stuck,
        async {
            let _ = stopped.await;
        },
        options,
    ));
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get("/stuck")
        .header("host", "x")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let pending = tokio::spawn(async move { sender.send_request(request).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns soon after the drain timeout")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    let outcome = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap();
    assert!(
        outcome.is_err(),
        "the stuck request's connection was closed"
    );
}

fn server_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_upcoach-server"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("UPCOACH_ADDR", "127.0.0.1:0")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_in_memory_and_exits_cleanly_on_sigterm() {
    let mut child = server_command().spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut log = Vec::new();
    let addr = loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no listening line; log so far: {log:#?}"));
        log.push(line.clone());
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    assert!(
        log.iter()
            .any(|l| l.contains("postgres=in-memory") && l.contains("redis=in-memory")),
        "{log:#?}"
    );

    let answer = support::request(addr, Method::GET, "/health", None).await;
    assert_eq!(answer.status, StatusCode::OK);

    let killed = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "exits within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(500)) {
        log.push(line);
    }
    assert!(status.success(), "exit status {status}; log: {log:#?}");
    assert!(
        log.iter().any(|l| l.contains("SIGTERM received")),
        "{log:#?}"
    );
    assert!(
        log.iter().any(|l| l.contains("shut down cleanly")),
        "{log:#?}"
    );
}

#[test]
fn a_bad_variable_stops_the_binary_with_a_message_naming_it() {
    let output = server_command()
        .env("SLOW_QUERY_THRESHOLD", "soon")
        .env("GOOGLE_CLIENT_ID", "id-without-secret")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("SLOW_QUERY_THRESHOLD is invalid"),
        "{stderr}"
    );
    assert!(
        stderr.contains("GOOGLE_CLIENT_SECRET is not set"),
        "{stderr}"
    );
}

#[test]
fn unknown_arguments_are_refused() {
    let output = server_command().arg("--devv").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
}
