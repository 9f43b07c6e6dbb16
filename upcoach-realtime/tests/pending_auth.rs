//! WebSocket connections opened without a token: they count against the pending-auth
//! budget (per address and in all), not the shared connection places, until their
//! `{"type":"auth"}` comes.

mod support;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use support::*;
use tokio_tungstenite::tungstenite::{self, Message};
use upcoach_core::{Role, UserId};
use upcoach_realtime::{Hub, HubConfig, MemoryBroadcaster};

const HERE: &str = "127.0.0.1";
const ELSEWHERE: &str = "127.0.0.2";

async fn setup(config: HubConfig) -> (Hub, Arc<Tokens>, std::net::SocketAddr) {
    let tokens = Arc::new(Tokens::default());
    let hub = Hub::builder(Arc::new(MemoryBroadcaster::default()), tokens.clone())
        .config(config)
        .build();
    let addr = serve(hub.clone()).await;
    (hub, tokens, addr)
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A WebSocket without a token from `from`.
async fn silent(from: &str, addr: std::net::SocketAddr) -> Result<Ws, tungstenite::Error> {
    ws_from(ip(from), addr, "/ws", None).await
}

/// The HTTP refusal of a handshake: status, `Retry-After`, and the error code.
fn refusal(result: Result<Ws, tungstenite::Error>) -> (u16, Option<String>, String) {
    match result {
        Err(tungstenite::Error::Http(response)) => {
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            let code = body["error"]["code"].as_str().unwrap().to_owned();
            (response.status().as_u16(), retry_after, code)
        }
        Ok(_) => panic!("the handshake was accepted"),
        Err(e) => panic!("the handshake failed without an HTTP answer: {e}"),
    }
}

/// Reads until the server closes: the close code and reason. Reads on after the close
/// frame, so that the client's answer goes out and the server is done at once.
async fn close_frame(ws: &mut Ws) -> Option<(u16, String)> {
    let mut close = None;
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the close in time")
        {
            Some(Ok(Message::Close(frame))) => {
                close = frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned()));
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return close,
        }
    }
}

async fn authenticate(ws: &mut Ws, token: &str) {
    send(ws, serde_json::json!({"type": "auth", "token": token})).await;
}

/// The reproduction: silent sockets from one address used to take the shared places
/// (and hold them for the auth timeout). Now they exhaust only their address's pending
/// budget; an authenticated client and another address still get in.
#[tokio::test]
async fn silent_sockets_from_one_address_exhaust_only_its_pending_budget() {
    let (hub, tokens, addr) = setup(HubConfig {
        max_connections: 3,
        max_pending_auth_per_address: 4,
        max_pending_auth: 256,
        auth_timeout: Duration::from_secs(30),
        ..HubConfig::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            silent(HERE, addr)
                .await
                .expect("within the address's budget"),
        );
    }
    let (status, retry_after, code) = refusal(silent(HERE, addr).await);
    assert_eq!(
        (status, retry_after.as_deref(), code.as_str()),
        (429, Some("30"), "too_many_pending_connections"),
        "the 5th silent socket from one address"
    );
    assert_eq!(hub.connections(), 0, "pending sockets take no shared place");
    let stats = hub.stats();
    assert_eq!(
        (
            stats.pending_auth_connections,
            stats.ws_connections,
            stats.refused,
            stats.refused_pending
        ),
        (4, 0, 1, 1)
    );
    let status = hub.status();
    assert_eq!((status.pending_auth, status.connections.ws), (4, 0));
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["connections"], serde_json::json!({"ws": 0, "sse": 0}));
    assert_eq!(json["pending_auth"], 4);

    // The same address with a token at the upgrade: a shared place, as before.
    let mut with_token = ws_from(ip(HERE), addr, "/ws", Some(&tokens.admin()))
        .await
        .expect("a token at the upgrade is not pending");
    subscribe(&mut with_token, "metrics", None).await;
    // Another address without a token: its own budget.
    let mut other = silent(ELSEWHERE, addr)
        .await
        .expect("another address has its own budget");
    assert_eq!(hub.stats().pending_auth_connections, 5);
    authenticate(&mut other, &tokens.admin()).await;
    subscribe(&mut other, "metrics", None).await;
    // The last shared place is still free for anyone with a token.
    let mut third = ws(addr, Some(&tokens.admin())).await;
    subscribe(&mut third, "metrics", None).await;
    assert_eq!(hub.connections(), 3);
    assert_eq!(hub.stats().pending_auth_connections, 4);

    // The silent sockets still authenticate once places free up.
    drop((with_token, third));
    eventually("two places free", || hub.connections() == 1).await;
    for ws in &mut held[..2] {
        authenticate(ws, &tokens.admin()).await;
        subscribe(ws, "metrics", None).await;
    }
    assert_eq!(hub.connections(), 3);
    assert_eq!(hub.stats().pending_auth_connections, 2);
    // Their address has room again.
    let _again = silent(HERE, addr).await.expect("pending places came back");
}

#[tokio::test]
async fn authenticating_takes_a_shared_place_or_closes_1013() {
    let (hub, tokens, addr) = setup(HubConfig {
        max_connections: 1,
        max_connections_per_user: 1,
        ..HubConfig::default()
    })
    .await;
    let me = UserId::new();
    let token = tokens.issue(me, &[Role::ADMIN], Duration::from_secs(900));
    let mut first = silent(HERE, addr).await.unwrap();
    let mut second = silent(HERE, addr).await.unwrap();
    assert_eq!(
        (hub.connections(), hub.stats().pending_auth_connections),
        (0, 2)
    );

    authenticate(&mut first, &token).await;
    subscribe(&mut first, "metrics", None).await;
    assert_eq!(
        (hub.connections(), hub.stats().pending_auth_connections),
        (1, 1)
    );

    // No shared place is left: the late authenticator is told to try later.
    authenticate(&mut second, &tokens.admin()).await;
    assert_eq!(
        close_frame(&mut second).await,
        Some((1013, "too_many_connections".into()))
    );
    eventually("the refused socket gives its pending place back", || {
        hub.stats().pending_auth_connections == 0
    })
    .await;
    assert_eq!(
        hub.connections(),
        1,
        "the refusal left the admitted one alone"
    );

    // A free place but the user's limit reached: the same code, the user's reason.
    let spare = Hub::builder(Arc::new(MemoryBroadcaster::default()), tokens.clone())
        .config(HubConfig {
            max_connections_per_user: 1,
            ..HubConfig::default()
        })
        .build();
    let spare_addr = serve(spare.clone()).await;
    let _mine = ws(spare_addr, Some(&token)).await;
    let mut again = silent(HERE, spare_addr).await.unwrap();
    authenticate(&mut again, &token).await;
    assert_eq!(
        close_frame(&mut again).await,
        Some((1013, "too_many_connections_for_user".into()))
    );
    eventually("no place is leaked", || {
        spare.connections() == 1 && spare.stats().pending_auth_connections == 0
    })
    .await;
    assert_eq!(spare.stats().refused, 1);
}

#[tokio::test]
async fn the_auth_timeout_gives_the_pending_place_back() {
    let (hub, tokens, addr) = setup(HubConfig {
        auth_timeout: Duration::from_millis(300),
        max_pending_auth_per_address: 1,
        ..HubConfig::default()
    })
    .await;
    let mut quiet = silent(HERE, addr).await.unwrap();
    let (status, retry_after, _) = refusal(silent(HERE, addr).await);
    assert_eq!(
        (status, retry_after.as_deref()),
        (429, Some("1")),
        "Retry-After: the auth timeout in whole seconds, rounded up"
    );
    assert_eq!(
        close_frame(&mut quiet).await,
        Some((4001, "token_missing".into()))
    );
    eventually("the pending place is back", || {
        hub.stats().pending_auth_connections == 0
    })
    .await;
    let mut next = silent(HERE, addr)
        .await
        .expect("the address has room again");
    authenticate(&mut next, &tokens.admin()).await;
    subscribe(&mut next, "metrics", None).await;
    assert_eq!(hub.stats().auth_failures, 1);
}

#[tokio::test]
async fn the_total_pending_budget_holds_across_addresses() {
    let (hub, tokens, addr) = setup(HubConfig {
        max_pending_auth: 2,
        max_pending_auth_per_address: 2,
        ..HubConfig::default()
    })
    .await;
    let _a = silent(HERE, addr).await.unwrap();
    let _b = silent(ELSEWHERE, addr).await.unwrap();
    let (status, _, code) = refusal(silent("127.0.0.3", addr).await);
    assert_eq!(
        (status, code.as_str()),
        (429, "too_many_pending_connections")
    );
    let _token = ws(addr, Some(&tokens.admin())).await;
    assert_eq!(hub.connections(), 1);
}

/// A token refused at the upgrade proves nothing either: the socket holds a pending
/// place until it is closed with 4001, even when every shared place is taken.
#[tokio::test]
async fn a_refused_token_is_closed_4001_without_a_shared_place() {
    let (hub, tokens, addr) = setup(HubConfig {
        max_connections: 1,
        ..HubConfig::default()
    })
    .await;
    let _full = ws(addr, Some(&tokens.admin())).await;
    let mut forged = ws_from(ip(HERE), addr, "/ws", Some("forged"))
        .await
        .expect("a bad token still upgrades, for the browser's sake");
    assert_eq!(
        close_frame(&mut forged).await.map(|(code, _)| code),
        Some(4001)
    );
    let refused = ws_with(addr, "/ws", Some(&tokens.admin()), None).await;
    assert_eq!(refusal(refused).0, 503, "a valid token still needs a place");
    eventually("the forged socket's pending place is back", || {
        hub.stats().pending_auth_connections == 0
    })
    .await;
    assert_eq!(hub.connections(), 1);
}

#[tokio::test]
async fn shutdown_closes_pending_sockets_1001_and_waits_for_them() {
    let (hub, _tokens, addr) = setup(HubConfig::default()).await;
    let mut pending = silent(HERE, addr).await.unwrap();
    let stopping = tokio::spawn({
        let hub = hub.clone();
        async move { hub.shutdown(Duration::from_secs(5)).await }
    });
    assert_eq!(
        close_frame(&mut pending).await.map(|(code, _)| code),
        Some(1001)
    );
    drop(pending);
    assert_eq!(stopping.await.unwrap(), 0);
    let (status, _, code) = refusal(silent(HERE, addr).await);
    assert_eq!((status, code.as_str()), (503, "shutting_down"));
}
