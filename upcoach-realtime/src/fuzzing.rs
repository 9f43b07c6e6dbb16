//! Entry points for the project's fuzz targets (`fuzz/`, see the README's "Hostile input
//! and soak"): the parsers a WebSocket connection runs on a client's text before any
//! state is touched. Not an API for hosts: hidden from the docs, and free to change.

use crate::wire::ClientMessage;

/// What a client's text frame asks for, as the connection reads it: the message's
/// `type` once the JSON parsed strictly and a named room passed [`validate_room`]
/// (as [`Hub::websocket`](crate::Hub::websocket) checks it before subscribing), or why
/// it is refused. Never panics.
///
/// [`validate_room`]: crate::validate_room
pub fn client_message(text: &str) -> Result<&'static str, String> {
    let parsed = ClientMessage::parse(text)?;
    match parsed {
        ClientMessage::Ping {} => Ok("ping"),
        ClientMessage::Auth { token: _ } => Ok("auth"),
        ClientMessage::Subscribe { room, .. } => {
            crate::validate_room(&room).map_err(|e| e.to_string())?;
            Ok("subscribe")
        }
        ClientMessage::Unsubscribe { room } => {
            crate::validate_room(&room).map_err(|e| e.to_string())?;
            Ok("unsubscribe")
        }
    }
}
