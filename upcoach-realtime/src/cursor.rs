//! The SSE cursor: where a connection stands in each of its rooms.

use std::fmt;

use crate::{MAX_ROOM_LEN, Position, validate_room};

/// The most rooms a cursor (and so one connection) may name.
pub const MAX_CURSOR_ROOMS: usize = 64;

/// The `id:` of every SSE record: the position delivered in each room of the
/// connection, as `room=seq@epoch` pairs joined by commas
/// (`metrics=120@3054718861,user:7=3@77`; `room=seq` when the epoch is not known, as
/// in cursors from before epochs). Any process can resume from it, since sequence
/// numbers and epochs are per room across processes.
///
/// ```
/// use upcoach_realtime::{Cursor, Position};
///
/// let mut cursor = Cursor::default();
/// cursor.set("metrics", Position::new(120, 3054718861));
/// cursor.set("public:news", Position::from(3));
/// let text = cursor.to_string();
/// assert_eq!(text, "metrics=120@3054718861,public:news=3");
/// let parsed: Cursor = text.parse().unwrap();
/// assert_eq!(parsed.get("metrics"), Some(Position::new(120, 3054718861)));
/// assert!("metrics=abc".parse::<Cursor>().is_err());
/// assert!("metrics=1@".parse::<Cursor>().is_err());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    rooms: Vec<(String, Position)>,
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
    pub fn get(&self, room: &str) -> Option<Position> {
        self.rooms.iter().find(|(r, _)| r == room).map(|(_, s)| *s)
    }

    /// Records `at` as the position in `room`.
    pub fn set(&mut self, room: &str, at: Position) {
        match self.rooms.iter_mut().find(|(r, _)| r == room) {
            Some((_, s)) => *s = at,
            None => self.rooms.push((room.to_owned(), at)),
        }
    }

    /// The rooms and positions, in the order they were first set.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Position)> {
        self.rooms.iter().map(|(r, s)| (r.as_str(), *s))
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (room, seq)) in self.rooms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match seq.epoch {
                0 => write!(f, "{room}={}", seq.seq)?,
                epoch => write!(f, "{room}={}@{epoch}", seq.seq)?,
            }
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
        // Per room: the name, `=`, a u64, `@`, a u32 and a comma.
        if s.len() > MAX_CURSOR_ROOMS * (MAX_ROOM_LEN + 33) {
            return Err(CursorError { reason: "too long" });
        }
        for pair in s.split(',') {
            let (room, seq) = pair.rsplit_once('=').ok_or(CursorError {
                reason: "expected room=seq pairs",
            })?;
            validate_room(room).map_err(|_| CursorError {
                reason: "a room name is not valid",
            })?;
            let (seq, epoch) = match seq.split_once('@') {
                Some((seq, epoch)) => (seq, Some(epoch)),
                None => (seq, None),
            };
            let seq = seq.parse::<u64>().map_err(|_| CursorError {
                reason: "a sequence number is not a number",
            })?;
            let epoch = match epoch {
                None => 0,
                Some(epoch) => match epoch.parse::<u32>() {
                    Ok(0) | Err(_) => {
                        return Err(CursorError {
                            reason: "an epoch is not a number from 1 to 4294967295",
                        });
                    }
                    Ok(epoch) => epoch,
                },
            };
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
            cursor
                .rooms
                .push((room.to_owned(), Position::new(seq, epoch)));
        }
        Ok(cursor)
    }
}
