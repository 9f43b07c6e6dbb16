//! The axum host keeps the connection caps too, through its `CappedListener`, and its
//! routes see the client's address.

mod support;

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use upcoach_core::config::Settings;
use upcoach_core::http::protect::LimitConfig;
use upcoach_testing::OidcProvider;

#[tokio::test]
async fn connections_over_the_per_address_cap_are_refused_and_places_come_back() {
    let Some(provider) = OidcProvider::start().await else {
        return;
    };
    let limits = LimitConfig::from_lookup(|n| {
        (n == "UPCOACH_MAX_CONNECTIONS_PER_ADDRESS").then(|| "2".into())
    })
    .unwrap();
    let (addr, app) = support::start_axum_with(&provider, false, &limits).await;
    let held = [
        TcpStream::connect(addr).await.unwrap(),
        TcpStream::connect(addr).await.unwrap(),
    ];
    let mut third = TcpStream::connect(addr).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), third.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(text.contains("too_many_connections_from_address"));

    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A refused bearer is audited with the address the listener saw.
    let answer = support::send(
        http::Method::GET,
        &format!("http://{addr}/auth/me"),
        &[("authorization", "Bearer bad.token.here")],
        "",
    )
    .await;
    assert_eq!(answer.status, 401);
    let rows = app
        .events
        .recent(upcoach_core::event::EventKind::Security, 10)
        .await
        .unwrap();
    let found = rows.iter().any(|e| {
        matches!(e, upcoach_core::event::Event::Security(s)
            if s.event_type == "token_rejected"
                && s.ip_address == Some("127.0.0.1".parse().unwrap()))
    });
    assert!(found, "{rows:?}");
}
