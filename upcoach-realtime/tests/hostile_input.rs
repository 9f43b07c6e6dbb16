//! Property tests of what a realtime client sends: SSE cursors (`Last-Event-ID`,
//! `last_event_id=`) are a cursor or a reason, never a panic, and read back what they
//! print; the SSE route answers any `Last-Event-ID` with a stream or a 400, never
//! more; a WebSocket client's text frame is one of four messages or refused, exactly as
//! the protocol says.

mod support;

use std::sync::{Arc, OnceLock};

use http::{HeaderValue, Request, StatusCode};
use proptest::prelude::*;
use serde_json::{Value, json};
use support::Tokens;
use upcoach_realtime::{
    Cursor, Hub, HubConfig, MemoryBroadcaster, Position, fuzzing, validate_room,
};

/// One hub for every case, with an admin's token, on a runtime of its own.
fn hub() -> &'static (tokio::runtime::Runtime, Hub, String) {
    static HUB: OnceLock<(tokio::runtime::Runtime, Hub, String)> = OnceLock::new();
    HUB.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tokens = Arc::new(Tokens::default());
        let token = tokens.admin();
        // Every case's stream ends when its response is dropped; the limits are lifted
        // so that none waits for the last one's place to be given back.
        let config = HubConfig {
            max_connections: 1_000_000,
            max_connections_per_user: 1_000_000,
            ..HubConfig::default()
        };
        let hub = runtime.block_on(async {
            Hub::builder(Arc::new(MemoryBroadcaster::default()), tokens)
                .config(config)
                .build()
        });
        (runtime, hub, token)
    })
}

/// The status of `GET /sse?rooms=...` with `Last-Event-ID: last_event_id`, and the
/// error code of a refusal.
fn sse_status(rooms: &str, last_event_id: &[u8]) -> (StatusCode, String) {
    let (runtime, hub, token) = hub();
    let mut request = Request::get(format!("/api/dashboard/realtime/sse?rooms={rooms}"))
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    if let Ok(value) = HeaderValue::from_bytes(last_event_id) {
        request.headers_mut().insert("last-event-id", value);
    }
    runtime.block_on(async {
        let response = hub.sse(request).await;
        let status = response.status();
        let code = if status.is_success() {
            String::new()
        } else {
            use http_body_util::BodyExt;
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let body: Value = serde_json::from_slice(&body).unwrap_or_default();
            body["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        (status, code)
    })
}

/// What a message's fields must be for the connection to accept it: the type's
/// fields and no other, a valid room where one is named, `since` a u64 or null.
fn oracle(message: &serde_json::Map<String, Value>) -> Option<&'static str> {
    let kind = message.get("type")?.as_str()?;
    let room_ok = || {
        message
            .get("room")
            .and_then(Value::as_str)
            .is_some_and(|room| validate_room(room).is_ok())
    };
    let only = |allowed: &[&str]| message.keys().all(|k| allowed.contains(&k.as_str()));
    match kind {
        "ping" if only(&["type"]) => Some("ping"),
        "auth" if only(&["type", "token"]) && message.get("token")?.is_string() => Some("auth"),
        "unsubscribe" if only(&["type", "room"]) && room_ok() => Some("unsubscribe"),
        "subscribe"
            if only(&["type", "room", "since", "epoch"])
                && room_ok()
                && message
                    .get("since")
                    .is_none_or(|s| s.is_null() || s.is_u64())
                && message.get("epoch").is_none_or(|e| {
                    e.is_null() || e.as_u64().is_some_and(|e| u32::try_from(e).is_ok())
                }) =>
        {
            Some("subscribe")
        }
        _ => None,
    }
}

/// A client message as a client might write it, well-formed or not.
fn client_messages() -> impl Strategy<Value = serde_json::Map<String, Value>> {
    let kind = prop_oneof![
        Just(json!("subscribe")),
        Just(json!("unsubscribe")),
        Just(json!("auth")),
        Just(json!("ping")),
        Just(json!("Subscribe")),
        Just(json!(1)),
        "[a-z]{0,8}".prop_map(Value::from),
    ];
    let room = prop_oneof![
        "[a-z]{1,8}:[a-z0-9@._-]{0,20}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        "[a-z]{129,140}".prop_map(Value::from),
        Just(json!(null)),
        Just(json!(7)),
    ];
    let since = prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::from)),
        Just(json!("3")),
        Just(json!(null)),
    ];
    let epoch = prop_oneof![
        any::<u32>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        Just(json!(-1)),
        Just(json!("7")),
        Just(json!(null)),
    ];
    let token = prop_oneof![any::<String>().prop_map(Value::from), Just(json!(42))];
    (
        proptest::option::of(kind),
        proptest::option::of(room),
        proptest::option::of(since),
        proptest::option::of(token),
        proptest::option::of(("[a-z]{1,6}", any::<i32>())),
        proptest::option::of(epoch),
    )
        .prop_map(|(kind, room, since, token, extra, epoch)| {
            let mut message = serde_json::Map::new();
            for (name, value) in [
                ("type", kind),
                ("room", room),
                ("since", since),
                ("epoch", epoch),
                ("token", token),
            ] {
                if let Some(value) = value {
                    message.insert(name.to_owned(), value);
                }
            }
            if let Some((name, value)) = extra {
                message.insert(name, Value::from(value));
            }
            message
        })
}

/// Found by the `ws_client_message` fuzz target: serde reads a tagged enum from an
/// array too, so `["unsubscribe","public:x"]` was accepted as an unsubscribe. A message
/// is a JSON object.
#[test]
fn a_message_in_array_form_is_refused() {
    assert_eq!(
        fuzzing::client_message(" \n{\"type\":\"unsubscribe\",\"room\":\"public:x\"}"),
        Ok("unsubscribe")
    );
    for text in [
        "\n[\"unsubscribe\",\r\"nsebscribe\"]",
        r#"["unsubscribe","public:x"]"#,
        r#"["subscribe","public:x",3]"#,
        r#"["ping"]"#,
        r#"["auth","a-token"]"#,
    ] {
        assert!(fuzzing::client_message(text).is_err(), "{text:?}");
    }
}

/// Found by `a_client_message_is_accepted_exactly_when_well_formed`: a `ping` with
/// other fields was accepted, though every message is parsed strictly.
#[test]
fn a_ping_with_other_fields_is_refused() {
    assert_eq!(fuzzing::client_message(r#"{"type":"ping"}"#), Ok("ping"));
    for text in [
        r#"{"type":"ping","since":0}"#,
        r#"{"type":"ping","room":"metrics"}"#,
    ] {
        assert!(fuzzing::client_message(text).is_err(), "{text}");
    }
}

proptest! {
    // No regression files written into the tree: a failing input found here is kept as
    // an explicit test beside these.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_text_is_a_cursor_or_a_reason(text in any::<String>()) {
        if let Ok(cursor) = text.parse::<Cursor>() {
            prop_assert_eq!(cursor.to_string().parse::<Cursor>().unwrap(), cursor);
        }
    }

    #[test]
    fn cursor_like_text_is_a_cursor_or_a_reason(text in "[a-z0-9:=,_.@-]{0,300}") {
        if let Ok(cursor) = text.parse::<Cursor>() {
            prop_assert_eq!(cursor.to_string().parse::<Cursor>().unwrap(), cursor);
        }
    }

    /// The SSE route with any `Last-Event-ID`: a stream when it is a cursor, else 400
    /// `invalid_cursor`; never a server error.
    #[test]
    fn any_last_event_id_is_a_stream_or_a_400(id in proptest::collection::vec(any::<u8>(), 0..400)) {
        let (status, code) = sse_status("public:news,metrics", &id);
        // A header that is no header value is not sent, and one that is not visible
        // ASCII is not read: the stream starts fresh.
        let sent = HeaderValue::from_bytes(&id).ok();
        let read = sent.as_ref().and_then(|v| v.to_str().ok());
        match read.map(str::parse::<Cursor>) {
            None | Some(Ok(_)) => prop_assert_eq!(status, StatusCode::OK, "{:?} {}", id, code),
            Some(Err(_)) => {
                prop_assert_eq!(status, StatusCode::BAD_REQUEST);
                prop_assert_eq!(code, "invalid_cursor");
            }
        }
    }

    /// Cursor-like `Last-Event-ID`s, which reach the resume of each room.
    #[test]
    fn cursor_like_last_event_ids_resume_or_are_refused(
        id in r"((public:news|metrics|user:[0-9]{1,3}|[a-z:]{0,6})=[0-9]{0,21}(@[0-9]{0,11})?,?){0,6}",
    ) {
        let (status, _) = sse_status("public:news,metrics", id.as_bytes());
        let expected = if id.parse::<Cursor>().is_ok() { StatusCode::OK } else { StatusCode::BAD_REQUEST };
        prop_assert_eq!(status, expected, "{:?}", id);
    }

    /// Any text as a WebSocket text frame: refused, or a JSON object of the type the
    /// connection acts on.
    #[test]
    fn any_text_frame_is_a_message_or_refused(text in any::<String>()) {
        if let Ok(kind) = fuzzing::client_message(&text) {
            let value: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(&value["type"], kind);
        }
    }

    /// A frame is accepted exactly when its fields are those of its type, its room is
    /// valid and `since` is a sequence number.
    #[test]
    fn a_client_message_is_accepted_exactly_when_well_formed(message in client_messages()) {
        let text = Value::Object(message.clone()).to_string();
        prop_assert_eq!(fuzzing::client_message(&text).ok(), oracle(&message), "{}", text);
    }

    #[test]
    fn a_cursor_of_valid_rooms_reads_back(
        rooms in proptest::collection::btree_map("public:[a-z0-9]{1,12}", (any::<u64>(), any::<u32>()), 0..20),
    ) {
        let text: Vec<String> = rooms
            .iter()
            .map(|(room, (seq, epoch))| match epoch {
                0 => format!("{room}={seq}"),
                epoch => format!("{room}={seq}@{epoch}"),
            })
            .collect();
        let cursor: Cursor = text.join(",").parse().unwrap();
        for (room, (seq, epoch)) in &rooms {
            prop_assert_eq!(cursor.get(room), Some(Position::new(*seq, *epoch)));
        }
        prop_assert_eq!(cursor.to_string().parse::<Cursor>().unwrap(), cursor);
    }
}
