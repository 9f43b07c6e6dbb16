//! The JSON of API.md's realtime protocol: events encoded once per process, client
//! messages parsed strictly.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::{Position, RoomEvent};

/// An event encoded once for every connection of this process.
#[derive(Debug)]
pub(crate) struct Encoded {
    pub(crate) room: Arc<str>,
    pub(crate) seq: u64,
    pub(crate) epoch: u32,
    pub(crate) event: String,
    /// `{"room","seq","epoch","event","data","ts"}`: the SSE `data:` line.
    pub(crate) json: String,
    /// `{"type":"event","room","seq","epoch","event","data","ts"}`: the WebSocket text
    /// message (the payload of `frame`).
    pub(crate) ws: Utf8Bytes,
    /// The whole WebSocket frame a server sends for `ws` (final, text, unmasked), which
    /// the fan-out writes to sockets as is.
    pub(crate) frame: Bytes,
}

#[derive(Serialize)]
struct EventBody<'a> {
    room: &'a str,
    seq: u64,
    epoch: u32,
    event: &'a str,
    data: &'a serde_json::Value,
    ts: u64,
}

impl Encoded {
    pub(crate) fn position(&self) -> Position {
        Position::new(self.seq, self.epoch)
    }

    pub(crate) fn new(event: &RoomEvent, room: Arc<str>) -> Self {
        let json = serde_json::to_string(&EventBody {
            room: &event.room,
            seq: event.seq,
            epoch: event.epoch,
            event: &event.event,
            data: &event.data,
            ts: event.ts_millis(),
        })
        // A Value with string keys always serializes.
        .unwrap_or_else(|_| String::from("{}"));
        let message = format!("{{\"type\":\"event\",{}", &json[1..]);
        let frame = text_frame(&message);
        let payload = frame.slice(frame.len() - message.len()..);
        // The payload is `message`'s bytes: UTF-8 (this never falls back).
        let ws = Utf8Bytes::try_from(payload).unwrap_or_else(|_| Utf8Bytes::from(message));
        Self {
            room,
            seq: event.seq,
            epoch: event.epoch,
            event: event.event.clone(),
            json,
            ws,
            frame,
        }
    }
}

/// A server's WebSocket frame for `text` (RFC 6455 section 5.2): final, opcode text, not
/// masked, the payload length in the shortest form.
fn text_frame(text: &str) -> Bytes {
    let len = text.len();
    let mut frame = Vec::with_capacity(len + 10);
    frame.push(0x81);
    if len < 126 {
        frame.push(len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        frame.push(126);
        frame.extend_from_slice(&short.to_be_bytes());
    } else {
        frame.push(127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    frame.extend_from_slice(text.as_bytes());
    Bytes::from(frame)
}

/// What a WebSocket client may send.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum ClientMessage {
    /// `since` is the last sequence number the client has; `epoch` the numbering it
    /// belongs to (from the `subscribed`, `event` or `reset` that told it), which
    /// older clients leave out.
    Subscribe {
        room: String,
        since: Option<u64>,
        epoch: Option<u32>,
    },
    Unsubscribe {
        room: String,
    },
    Auth {
        token: String,
    },
    /// A struct variant, not a unit one: serde checks `deny_unknown_fields` only on the
    /// fields of a struct variant, so a unit `Ping` accepted `{"type":"ping","x":1}`
    /// (found by the property tests of `tests/hostile_input.rs`).
    Ping {},
}

impl ClientMessage {
    /// A client's text frame: a JSON object of one of the message types, nothing else.
    /// (serde also reads a tagged enum from an array, `["unsubscribe","room"]`, which
    /// the protocol does not speak: found by the `ws_client_message` fuzz target.)
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        if !text
            .trim_start_matches([' ', '\t', '\n', '\r'])
            .starts_with('{')
        {
            return Err("a message is a JSON object".into());
        }
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ServerMessage<'a> {
    Subscribed {
        room: &'a str,
        seq: u64,
        epoch: u32,
    },
    /// `seq` and `epoch`: where the client now stands, to resume from.
    Reset {
        room: &'a str,
        reason: &'a str,
        seq: u64,
        epoch: u32,
    },
    Error {
        code: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
    },
    Pong,
}

impl ServerMessage<'_> {
    pub(crate) fn text(&self) -> Utf8Bytes {
        Utf8Bytes::from(serde_json::to_string(self).unwrap_or_else(|_| String::from("{}")))
    }
}

/// `{"room","reason"}`: the data of an SSE `reset` record.
pub(crate) fn reset_json(room: &str, reason: &str) -> String {
    serde_json::json!({ "room": room, "reason": reason }).to_string()
}

#[cfg(test)]
mod tests {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    use super::{Encoded, text_frame};

    /// The frame the fan-out writes is byte for byte the one tungstenite writes for the
    /// same text, at each length form's edges (7-bit, 16-bit and 64-bit lengths).
    #[test]
    fn a_text_frame_is_the_one_tungstenite_writes() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let text = "a".repeat(len);
            let mut theirs = Vec::new();
            Frame::message(text.clone().into_bytes(), OpCode::Data(Data::Text), true)
                .format(&mut theirs)
                .unwrap();
            assert_eq!(&text_frame(&text)[..], &theirs[..], "length {len}");
        }
    }

    /// An event's WebSocket message is the payload of its frame (one allocation).
    #[test]
    fn an_events_message_is_its_frames_payload() {
        let event = crate::RoomEvent {
            room: "metrics".into(),
            seq: 7,
            epoch: 3,
            event: "tick".into(),
            data: serde_json::json!({"cpu": 0.5, "note": "é"}),
            ts: std::time::SystemTime::UNIX_EPOCH,
        };
        let encoded = Encoded::new(&event, "metrics".into());
        let payload = encoded.ws.as_str().as_bytes();
        assert!(encoded.frame.ends_with(payload));
        assert_eq!(encoded.frame.len(), payload.len() + 2, "a 7-bit length");
        assert!(
            encoded
                .ws
                .as_str()
                .starts_with(r#"{"type":"event","room":"metrics","seq":7"#)
        );
    }
}
