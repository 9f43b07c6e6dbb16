//! The fault proxy against a local echo server: forwards, cuts, refuses, restores, stalls.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use upcoach_testing::FaultProxy;

async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    Ok(buf)
}

/// A read that ends (EOF or error) instead of hanging: the link is closed.
async fn is_closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn forwards_cuts_refuses_and_restores() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut live, b"hello").await.unwrap(), b"hello");

    proxy.cut();
    assert!(proxy.is_cut());
    assert!(
        is_closed(&mut live).await,
        "an open link is closed by the cut"
    );

    let mut during = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(
        is_closed(&mut during).await,
        "a new link is closed at once while cut"
    );
    assert_eq!(proxy.refused(), 1);

    proxy.restore();
    let mut after = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut after, b"again").await.unwrap(), b"again");
    assert_eq!(proxy.forwarded(), 2);
}

#[tokio::test]
async fn a_stall_silences_open_links_without_closing_them() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut stalled = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut stalled, b"hello").await.unwrap(), b"hello");

    proxy.stall();
    stalled.write_all(b"lost").await.unwrap();
    let mut buf = [0u8; 4];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stalled.read(&mut buf))
            .await
            .is_err(),
        "no answer and no close: the read just waits"
    );

    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut fresh, b"new").await.unwrap(), b"new");

    proxy.cut();
    assert!(
        is_closed(&mut stalled).await,
        "a cut closes a stalled link too"
    );
}

#[test]
fn service_addresses_and_urls_via_a_proxy() {
    let addr = upcoach_testing::service_addr("postgres://postgres@localhost:5433/test");
    assert_eq!(addr.to_string(), "127.0.0.1:5433");
    assert_eq!(
        upcoach_testing::service_addr("redis://127.0.0.1").to_string(),
        "127.0.0.1:6379"
    );
    let via = upcoach_testing::url_via(
        "postgres://postgres@127.0.0.1:5432/test",
        "127.0.0.1:40000".parse().unwrap(),
    );
    assert_eq!(via, "postgres://postgres@127.0.0.1:40000/test");
}
