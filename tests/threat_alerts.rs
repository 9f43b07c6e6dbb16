//! Threat detection reaches the dashboard: a brute force recorded through the
//! detector becomes an `alert` event that an admin's SSE client of the `security` (and
//! `alerts`) room reads, published through an `AlertPublisher` wired to the realtime hub.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use upcoach_auth::session::{AccessTokens, SigningKey};
use upcoach_auth::threat::{
    ALERT_EVENT, ALERT_ROOMS, AlertPublisherFn, ThreatDetector, alert_payload,
};
use upcoach_core::event::{
    ClientFacts, EventKind, EventLog, MemoryEventLog, SecurityEvent, SystemAlert,
};
use upcoach_core::{Role, SessionId, SystemClock, UserId};
use upcoach_realtime::{HistoryLimits, Hub, MemoryBroadcaster};

const WAIT: Duration = Duration::from_secs(10);

/// Serves `hub`'s SSE route at `/sse` on a random port.
async fn serve(hub: Hub) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let hub = hub.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let hub = hub.clone();
                        async move { Ok::<_, std::convert::Infallible>(hub.sse(request).await) }
                    },
                );
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// One SSE record: its `event:` and `data:` fields.
#[derive(Debug)]
struct Record {
    event: Option<String>,
    data: Option<String>,
}

/// An SSE client over plain HTTP/1.0 (the body then comes unchunked, until close).
struct SseClient {
    stream: TcpStream,
    buffer: String,
}

impl SseClient {
    async fn open(addr: SocketAddr, rooms: &str, token: &str) -> Self {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET /sse?rooms={rooms} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut client = Self {
            stream,
            buffer: String::new(),
        };
        let head = client.until("\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1."), "{head}");
        assert!(head.contains(" 200 "), "the stream is open: {head}");
        client
    }

    /// Reads until `end`; returns what came before it.
    async fn until(&mut self, end: &str) -> String {
        loop {
            if let Some(at) = self.buffer.find(end) {
                let before = self.buffer[..at].to_owned();
                self.buffer.drain(..at + end.len());
                return before;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("the stream says something in time")
                .unwrap();
            assert!(n > 0, "the stream stays open");
            self.buffer
                .push_str(std::str::from_utf8(&chunk[..n]).unwrap());
        }
    }

    async fn next(&mut self) -> Record {
        let text = self.until("\n\n").await;
        let mut record = Record {
            event: None,
            data: None,
        };
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("event: ") {
                record.event = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("data: ") {
                record.data = Some(v.to_owned());
            }
        }
        record
    }

    /// The next record dispatching `event`, other records skipped.
    async fn next_event(&mut self, event: &str) -> serde_json::Value {
        loop {
            let record = self.next().await;
            if record.event.as_deref() == Some(event) {
                return serde_json::from_str(record.data.as_deref().unwrap()).unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brute_force_alert_reaches_an_sse_client_of_the_security_room() {
    let clock = Arc::new(SystemClock);
    let tokens = Arc::new(AccessTokens::new(
        SigningKey::generate().unwrap(),
        clock.clone(),
    ));
    let broadcaster = MemoryBroadcaster::new(HistoryLimits::default(), clock.clone());
    let hub = Hub::builder(Arc::new(broadcaster), tokens.clone()).build();
    let addr = serve(hub.clone()).await;

    // What a host wires: each alert to the `alerts` and `security` rooms.
    let publisher = AlertPublisherFn::new(move |alert: SystemAlert| {
        let hub = hub.clone();
        async move {
            let data = alert_payload(&alert);
            for room in ALERT_ROOMS {
                hub.publish(room, ALERT_EVENT, data.clone()).await.unwrap();
            }
        }
    });
    let log = Arc::new(MemoryEventLog::default());
    let detector = ThreatDetector::builder(log.clone())
        .publisher(Arc::new(publisher))
        .build();

    let admin = tokens
        .issue(UserId::new(), vec![Role::ADMIN], SessionId::new())
        .unwrap()
        .token;
    let mut client = SseClient::open(addr, "security,alerts", &admin).await;
    let first = client.next().await;
    assert_eq!(first.event, None, "the opening record (retry and cursor)");

    let facts = ClientFacts {
        ip: Some("203.0.113.7".parse().unwrap()),
        ..ClientFacts::default()
    };
    for _ in 0..10 {
        let failed = SecurityEvent::new("login_failed", clock.as_ref())
            .client(&facts)
            .details(serde_json::json!({"provider": "google", "code": "invalid_token"}));
        detector.record(failed.into()).unwrap();
    }

    let mut rooms = Vec::new();
    for _ in 0..2 {
        let record = client.next_event(ALERT_EVENT).await;
        rooms.push(record["room"].as_str().unwrap().to_owned());
        assert_eq!(record["event"], "alert");
        let alert = &record["data"];
        assert_eq!(alert["rule"], "brute_force_address");
        assert_eq!(alert["detector"], "brute_force_address");
        assert_eq!(alert["subject"], "ip:203.0.113.7");
        assert_eq!(alert["state"], "firing");
        assert_eq!(alert["level"], "warning");
        assert_eq!(alert["value"], 10);
        assert_eq!(alert["threshold"], 10);
        assert_eq!(alert["window_s"], 300);
        assert_eq!(alert["source"], "auth");
        assert!(alert["at"].is_u64());
        assert!(
            !record.to_string().contains("invalid_token"),
            "no code reaches the dashboard"
        );
    }
    rooms.sort();
    assert_eq!(rooms, ["alerts", "security"]);

    // The same alert is a `system_alerts` row.
    detector.idle().await;
    let stored = log.recent(EventKind::Alert, 10).await.unwrap();
    assert_eq!(stored.len(), 1);
}
