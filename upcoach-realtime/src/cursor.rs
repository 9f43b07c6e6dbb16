//! The SSE cursor: where a connection stands in each of its rooms.

use std::fmt;

use crate::{MAX_ROOM_LEN, validate_room};

/// The most rooms a cursor (and so one connection) may name.
pub const MAX_CURSOR_ROOMS: usize = 64;

/// The `id:` of every SSE record: the last sequence number delivered in each room of
/// the connection, as `room=seq` pairs joined by commas (`metrics=120,user:7=3`). Any
/// process can resume from it, since sequence numbers are per room across processes.
///
/// ```
/// use upcoach_realtime::Cursor;
///
/// let mut cursor = Cursor::default();
/// cursor.set("metrics", 120);
/// cursor.set("public:news", 3);
/// let text = cursor.to_string();
/// assert_eq!(text, "metrics=120,public:news=3");
/// assert_eq!(text.parse::<Cursor>().unwrap().get("metrics"), Some(120));
/// assert!("metrics=abc".parse::<Cursor>().is_err());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    rooms: Vec<(String, u64)>,
}

/// A cursor that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cursor: {reason}")]
pub struct CursorError {
    /// Why.
    pub reason: &'static str,
}

impl Cursor {
    /// The position in `room`, if the cursor names it.
    pub fn get(&self, room: &str) -> Option<u64> {
        self.rooms.iter().find(|(r, _)| r == room).map(|(_, s)| *s)
    }

    /// Records `seq` as the position in `room`.
    pub fn set(&mut self, room: &str, seq: u64) {
        match self.rooms.iter_mut().find(|(r, _)| r == room) {
            Some((_, s)) => *s = seq,
            None => self.rooms.push((room.to_owned(), seq)),
        }
    }

    /// The rooms and positions, in the order they were first set.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.rooms.iter().map(|(r, s)| (r.as_str(), *s))
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (room, seq)) in self.rooms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{room}={seq}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Cursor {
    type Err = CursorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cursor = Cursor::default();
        if s.is_empty() {
            return Ok(cursor);
        }
        if s.len() > MAX_CURSOR_ROOMS * (MAX_ROOM_LEN + 22) {
            return Err(CursorError { reason: "too long" });
        }
        for pair in s.split(',') {
            let (room, seq) = pair.rsplit_once('=').ok_or(CursorError {
                reason: "expected room=seq pairs",
            })?;
            validate_room(room).map_err(|_| CursorError {
                reason: "a room name is not valid",
            })?;
            let seq = seq.parse::<u64>().map_err(|_| CursorError {
                reason: "a sequence number is not a number",
            })?;
            if cursor.get(room).is_some() {
                return Err(CursorError {
                    reason: "a room appears twice",
                });
            }
            if cursor.rooms.len() == MAX_CURSOR_ROOMS {
                return Err(CursorError {
                    reason: "too many rooms",
                });
            }
            cursor.rooms.push((room.to_owned(), seq));
        }
        Ok(cursor)
    }
}
