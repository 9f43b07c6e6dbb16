//! The SSE transport against an in-memory hub: record format, exact resume with the
//! cursor, reset, gzip, refusals, pings, slow consumers and shutdown.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use upcoach_core::{Role, UserId};
use upcoach_realtime::{Cursor, HistoryLimits, Hub, HubConfig, MemoryBroadcaster, Position};

async fn setup(
    config: HubConfig,
    history: HistoryLimits,
) -> (Hub, Arc<Tokens>, std::net::SocketAddr) {
    let tokens = Arc::new(Tokens::default());
    let broadcaster = MemoryBroadcaster::new(history, Arc::new(upcoach_core::SystemClock));
    let hub = Hub::builder(Arc::new(broadcaster), tokens.clone())
        .config(config)
        .build();
    let addr = serve(hub.clone()).await;
    (hub, tokens, addr)
}

/// The cursor of `positions` in `hub`'s rooms, each with its room's epoch.
async fn cursor(hub: &Hub, positions: &[(&str, u64)]) -> String {
    let mut cursor = Cursor::default();
    for (room, seq) in positions {
        let epoch = hub.broadcaster().head(room).await.unwrap().epoch;
        cursor.set(room, Position::new(*seq, epoch));
    }
    cursor.to_string()
}

/// A hub whose `public:x` holds `events` events, and an admin's stream of it opened
/// with the `Last-Event-ID` that `last_event_id` makes of the room's epoch.
async fn resumed_x(events: u64, last_event_id: impl FnOnce(u32) -> String) -> (Hub, Sse) {
    let (hub, tokens, addr) = setup(HubConfig::default(), HistoryLimits::default()).await;
    for i in 0..events {
        hub.publish("public:x", "n", serde_json::json!(i))
            .await
            .unwrap();
    }
    let epoch = hub.broadcaster().head("public:x").await.unwrap().epoch;
    let id = last_event_id(epoch);
    let auth = format!("Bearer {}", tokens.admin());
    let stream = sse(
        addr,
        "rooms=public:x",
        &[("authorization", &auth), ("last-event-id", &id)],
    )
    .await;
    (hub, stream)
}

fn data(record: &Record) -> serde_json::Value {
    serde_json::from_str(record.data.as_deref().unwrap()).unwrap()
}

// Every test runs twice: `handed_over::` (upcoach's accept loop, the stream writes to
// its connection) and `through_the_body::` (a plain hyper loop).
on_both_servers! {
    async fn records_follow_the_api_format() {
        let (hub, tokens, addr) = setup(HubConfig::default(), HistoryLimits::default()).await;
        hub.publish("metrics", "tick", serde_json::json!(0))
            .await
            .unwrap();
        let auth = format!("Bearer {}", tokens.admin());
        let mut stream = sse(addr, "rooms=metrics,alerts", &[("authorization", &auth)]).await;
        assert_eq!(stream.version, sse_version(), "how the stream is written");
        assert!(
            stream.headers.get("content-length").is_none(),
            "the stream has no length"
        );
        assert_eq!(stream.status, 200);
        assert_eq!(stream.headers["content-type"], "text/event-stream");
        let first = stream.next().await.unwrap();
        assert_eq!(first.retry, Some(3000), "retry: 3000 first");
        assert_eq!(
            first.id.as_deref(),
            Some(
                cursor(&hub, &[("metrics", 1), ("alerts", 0)])
                    .await
                    .as_str()
            ),
            "the starting cursor"
        );
        assert_eq!(first.event, None, "an id-only record dispatches nothing");
        hub.publish("alerts", "fired", serde_json::json!({"rule": "p95"}))
            .await
            .unwrap();
        let record = stream.next_event().await;
        assert_eq!(
            record.id.as_deref(),
            Some(
                cursor(&hub, &[("metrics", 1), ("alerts", 1)])
                    .await
                    .as_str()
            )
        );
        assert_eq!(record.event.as_deref(), Some("fired"));
        let body = data(&record);
        assert_eq!(body["room"], "alerts");
        assert_eq!(body["seq"], 1);
        assert_eq!(body["event"], "fired");
        assert_eq!(body["data"]["rule"], "p95");
        assert!(body["ts"].is_u64());
    }

    async fn a_reconnect_with_last_event_id_resumes_every_room_exactly() {
        let (hub, tokens, addr) = setup(HubConfig::default(), HistoryLimits::default()).await;
        let auth = format!("Bearer {}", tokens.admin());
        let mut stream = sse(addr, "rooms=public:x,public:y", &[("authorization", &auth)]).await;
        stream.next().await.unwrap();
        hub.publish("public:x", "n", serde_json::json!("x1"))
            .await
            .unwrap();
        hub.publish("public:y", "n", serde_json::json!("y1"))
            .await
            .unwrap();
        stream.next_event().await;
        let cursor = stream.next_event().await.id.unwrap();
        let epochs = (
            hub.broadcaster().head("public:x").await.unwrap().epoch,
            hub.broadcaster().head("public:y").await.unwrap().epoch,
        );
        assert_eq!(
            cursor,
            format!("public:x=1@{},public:y=1@{}", epochs.0, epochs.1)
        );
        drop(stream);

        for i in 2..=501 {
            let room = if i % 3 == 0 { "public:y" } else { "public:x" };
            hub.publish(room, "n", serde_json::json!(i)).await.unwrap();
        }
        let heads = (
            hub.broadcaster().head("public:x").await.unwrap().seq,
            hub.broadcaster().head("public:y").await.unwrap().seq,
        );
        // Both ways of giving the cursor.
        for (query, headers) in [
            (
                "rooms=public:x,public:y".to_owned(),
                vec![
                    ("authorization", auth.as_str()),
                    ("last-event-id", cursor.as_str()),
                ],
            ),
            (
                format!("rooms=public:x,public:y&last_event_id={cursor}"),
                vec![("authorization", auth.as_str())],
            ),
        ] {
            let mut resumed = sse(addr, &query, &headers).await;
            let start = resumed.next().await.unwrap();
            assert_eq!(
                start.id.as_deref(),
                Some(cursor.as_str()),
                "resumes from the cursor"
            );
            let mut last = (1u64, 1u64);
            while last != heads {
                let record = resumed.next_event().await;
                let body = data(&record);
                let seq = body["seq"].as_u64().unwrap();
                let slot = if body["room"] == "public:x" {
                    &mut last.0
                } else {
                    &mut last.1
                };
                assert_eq!(seq, *slot + 1, "each missed event once, in order: {body}");
                *slot = seq;
                let parsed: Cursor = record.id.unwrap().parse().unwrap();
                assert_eq!(
                    (parsed.get("public:x"), parsed.get("public:y")),
                    (
                        Some(Position::new(last.0, epochs.0)),
                        Some(Position::new(last.1, epochs.1))
                    )
                );
            }
            hub.publish("public:y", "n", serde_json::json!("live"))
                .await
                .unwrap();
            let live = data(&resumed.next_event().await);
            assert_eq!(
                (live["room"].as_str(), live["data"].as_str()),
                (Some("public:y"), Some("live"))
            );
            hub.broadcaster().head("public:y").await.unwrap();
        }
    }

    async fn a_cursor_older_than_history_gets_reset() {
        let (hub, tokens, addr) = setup(
            HubConfig::default(),
            HistoryLimits {
                max_events: 5,
                max_age: Duration::from_secs(60),
            },
        )
        .await;
        for i in 0..20 {
            hub.publish("alerts", "fired", serde_json::json!(i))
                .await
                .unwrap();
        }
        let auth = format!("Bearer {}", tokens.admin());
        let mut stream = sse(
            addr,
            "rooms=alerts",
            &[("authorization", &auth), ("last-event-id", "alerts=3")],
        )
        .await;
        stream.next().await.unwrap();
        let reset = stream.next_event().await;
        assert_eq!(reset.event.as_deref(), Some("reset"));
        assert_eq!(
            data(&reset),
            serde_json::json!({"room": "alerts", "reason": "history_expired"})
        );
        assert_eq!(
            reset.id.as_deref(),
            Some(cursor(&hub, &[("alerts", 20)]).await.as_str()),
            "the cursor moves to the head"
        );
        hub.publish("alerts", "fired", serde_json::json!(20))
            .await
            .unwrap();
        assert_eq!(data(&stream.next_event().await)["seq"], 21);
    }

    async fn gzip_is_flushed_per_record() {
        let (hub, tokens, addr) = setup(HubConfig::default(), HistoryLimits::default()).await;
        let auth = format!("Bearer {}", tokens.admin());
        let mut stream = sse(
            addr,
            "rooms=metrics",
            &[("authorization", &auth), ("accept-encoding", "br, gzip")],
        )
        .await;
        assert_eq!(stream.headers["content-encoding"], "gzip");
        stream.next().await.unwrap();
        for i in 0..3 {
            hub.publish("metrics", "tick", serde_json::json!(i))
                .await
                .unwrap();
            // Each record is readable on its own, before the next is published.
            assert_eq!(data(&stream.next_event().await)["data"], i);
        }
        let plain = sse(
            addr,
            "rooms=metrics",
            &[("authorization", &auth), ("accept-encoding", "gzip;q=0")],
        )
        .await;
        assert!(plain.headers.get("content-encoding").is_none());
    }

    async fn refusals_have_statuses_and_codes() {
        let (_hub, tokens, addr) = setup(
            HubConfig {
                allowed_origins: vec!["https://app.example.com".into()],
                ..HubConfig::default()
            },
            HistoryLimits::default(),
        )
        .await;
        let admin = format!("Bearer {}", tokens.admin());
        let user = format!(
            "Bearer {}",
            tokens.issue(UserId::new(), &[Role::USER], Duration::from_secs(900))
        );
        type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str);
        let cases: Vec<Case<'_>> = vec![
            ("rooms=metrics", vec![], 401, "token_missing"),
            (
                "rooms=metrics",
                vec![("authorization", "Bearer forged")],
                401,
                "token_invalid",
            ),
            (
                "rooms=metrics",
                vec![("authorization", &user)],
                403,
                "forbidden",
            ),
            (
                "rooms=public:a,metrics",
                vec![("authorization", &user)],
                403,
                "forbidden",
            ),
            ("", vec![("authorization", &admin)], 400, "invalid_rooms"),
            (
                "rooms=a%20b",
                vec![("authorization", &admin)],
                400,
                "invalid_rooms",
            ),
            (
                "rooms=metrics",
                vec![("authorization", &admin), ("last-event-id", "metrics=x")],
                400,
                "invalid_cursor",
            ),
            (
                "rooms=metrics",
                vec![
                    ("authorization", &admin),
                    ("origin", "https://evil.example"),
                ],
                403,
                "origin_not_allowed",
            ),
        ];
        for (query, headers, status, code) in cases {
            let response = sse(addr, query, &headers).await;
            assert_eq!(response.status, status, "{query} {headers:?}");
            let body: serde_json::Value = serde_json::from_str(&response.text().await).unwrap();
            assert_eq!(body["error"]["code"], code, "{query} {headers:?}");
        }
        let allowed = sse(
            addr,
            "rooms=public:a",
            &[
                ("authorization", &user),
                ("origin", "https://app.example.com"),
            ],
        )
        .await;
        assert_eq!(allowed.status, 200);
        assert_eq!(
            allowed.headers["access-control-allow-origin"],
            "https://app.example.com"
        );
    }

    async fn pings_keep_the_stream_alive_and_shutdown_ends_it() {
        let (hub, tokens, addr) = setup(
            HubConfig {
                sse_ping_interval: Duration::from_millis(100),
                ..HubConfig::default()
            },
            HistoryLimits::default(),
        )
        .await;
        let auth = format!("Bearer {}", tokens.admin());
        let mut stream = sse(addr, "rooms=metrics", &[("authorization", &auth)]).await;
        stream.next().await.unwrap();
        assert!(stream.next().await.unwrap().comment, ": ping");
        assert_eq!(hub.status().connections.sse, 1);
        let stopping = tokio::spawn({
            let hub = hub.clone();
            async move { hub.shutdown(Duration::from_secs(5)).await }
        });
        while let Some(record) = stream.next().await {
            assert!(record.comment, "nothing but pings before the end");
        }
        assert_eq!(stopping.await.unwrap(), 0);
    }

    async fn a_stuck_sse_client_is_cut_off() {
        let (hub, tokens, addr) = setup(
            HubConfig {
                queue_capacity: 16,
                ..HubConfig::default()
            },
            HistoryLimits::default(),
        )
        .await;
        let auth = format!("Bearer {}", tokens.admin());
        let mut stream = sse(addr, "rooms=metrics", &[("authorization", &auth)]).await;
        stream.next().await.unwrap();
        let payload = "z".repeat(4096);
        for _ in 0..3000 {
            hub.publish("metrics", "tick", serde_json::json!(payload))
                .await
                .unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(hub.stats().slow_consumers_closed, 1);
        let mut received = 0;
        while stream.next().await.is_some() {
            received += 1;
        }
        assert!(received < 3000, "cut off, not fed everything ({received})");
        assert_eq!(hub.status().connections.sse, 0);
    }

    async fn a_client_that_goes_away_is_noticed_without_waiting_for_a_ping() {
        let (hub, tokens, addr) = setup(HubConfig::default(), HistoryLimits::default()).await;
        let auth = format!("Bearer {}", tokens.admin());
        let mut stream = sse(addr, "rooms=metrics", &[("authorization", &auth)]).await;
        stream.next().await.unwrap();
        assert_eq!(hub.status().connections.sse, 1);
        drop(stream);
        until(
            "the stream let go of after its client left (pings are 15 s apart)",
            Duration::from_secs(2),
            || hub.status().connections.sse == 0,
        )
        .await;
    }

    async fn pings_and_events_flow_until_the_token_expires_then_the_stream_ends() {
        // One timer serves the ping and the token's expiry: both must still happen, in
        // order, with events in between.
        let (hub, tokens, addr) = setup(
            HubConfig {
                sse_ping_interval: Duration::from_millis(150),
                ..HubConfig::default()
            },
            HistoryLimits::default(),
        )
        .await;
        let me = UserId::new();
        let token = tokens.issue(me, &[Role::ADMIN], Duration::from_millis(1200));
        let auth = format!("Bearer {token}");
        let mut stream = sse(addr, "rooms=metrics", &[("authorization", &auth)]).await;
        stream.next().await.unwrap();
        assert!(stream.next().await.unwrap().comment, "a ping first");
        hub.publish("metrics", "tick", serde_json::json!(1))
            .await
            .unwrap();
        let mut pings = 0;
        let mut events = Vec::new();
        while let Some(record) = stream.next().await {
            if record.comment {
                pings += 1;
            } else {
                events.push(data(&record)["data"].clone());
            }
        }
        assert_eq!(events, vec![serde_json::json!(1)], "the event, once");
        assert!(pings >= 3, "pings went on until the expiry ({pings})");
        until("the stream's place given back", Duration::from_secs(2), || {
            hub.status().connections.sse == 0
        })
        .await;
    }

    async fn a_cursor_ahead_of_the_room_gets_reset_not_silence() {
        // A cursor from before a restart: the room's numbers started again.
        let (hub, mut stream) = resumed_x(3, |_| "public:x=999".into()).await;
        let first = stream.next().await.unwrap();
        assert_eq!(
            first.id.as_deref(),
            Some(cursor(&hub, &[("public:x", 3)]).await.as_str()),
            "the stream starts at the head, not at 999"
        );
        let reset = stream.next_event().await;
        assert_eq!(
            data(&reset),
            serde_json::json!({"room": "public:x", "reason": "cursor_ahead_of_room"})
        );
        hub.publish("public:x", "n", serde_json::json!("live"))
            .await
            .unwrap();
        assert_eq!(
            data(&stream.next_event().await)["seq"],
            4,
            "live events flow again"
        );
    }

    /// A cursor without epochs (`room=seq`, as before epochs) resumes as it says, and the
    /// stream's opening cursor already names the room's epoch (so the client's next resume
    /// is checked against the room's numbering).
    async fn a_cursor_without_an_epoch_resumes_and_takes_the_rooms_epoch() {
        let (hub, mut stream) = resumed_x(3, |_| "public:x=1".into()).await;
        let first = stream.next().await.unwrap();
        assert_eq!(
            first.id.as_deref(),
            Some(cursor(&hub, &[("public:x", 1)]).await.as_str()),
            "the opening cursor names the room's epoch"
        );
        let seqs =
            [stream.next_event().await, stream.next_event().await].map(|r| data(&r)["seq"].clone());
        assert_eq!(seqs, [2, 3], "the missed events, once each");
    }

    /// A cursor of another numbering of the room (one before a restart), even below the
    /// room's head: `reset` (`room_restarted`) and the head, never the events after its
    /// number in this numbering.
    async fn a_cursor_of_another_numbering_gets_reset_even_below_the_head() {
        // A position in another numbering than the room's.
        let (hub, mut stream) = resumed_x(5, |epoch| {
            format!("public:x=2@{}", epoch.wrapping_add(1).max(1))
        })
        .await;
        let first = stream.next().await.unwrap();
        assert_eq!(
            first.id.as_deref(),
            Some(cursor(&hub, &[("public:x", 5)]).await.as_str())
        );
        let reset = stream.next_event().await;
        assert_eq!(
            data(&reset),
            serde_json::json!({"room": "public:x", "reason": "room_restarted"})
        );
    }

    /// A stream's token is checked before it takes a place: requests without a valid one
    /// never hold any, and get 401 even when every place is taken.
    async fn tokens_are_checked_before_a_place_is_taken() {
        let (hub, tokens, addr) = setup(
            HubConfig {
                max_connections: 1,
                ..HubConfig::default()
            },
            HistoryLimits::default(),
        )
        .await;
        for _ in 0..3 {
            let refused = sse(addr, "rooms=metrics", &[("authorization", "Bearer forged")]).await;
            assert_eq!(refused.status, 401);
        }
        assert_eq!(hub.connections(), 0);
        let admin = format!("Bearer {}", tokens.admin());
        let open = sse(addr, "rooms=metrics", &[("authorization", &admin)]).await;
        assert_eq!(open.status, 200);
        let no_token = sse(addr, "rooms=metrics", &[]).await;
        assert_eq!(no_token.status, 401, "not 503: the token is checked first");
        let full = sse(addr, "rooms=metrics", &[("authorization", &admin)]).await;
        assert_eq!(full.status, 503);
        assert_eq!(hub.stats().refused, 1);
    }
}
