//! [`EventRow`]: a validated record in the compact form both backends keep: JSON already
//! serialized, so what it holds in memory is what its size says.

use std::net::IpAddr;
use std::time::SystemTime;

use uuid::Uuid;

use super::{
    AlertLevel, Event, EventKind, EventLogError, SecurityEvent, SystemAlert, WebSocketEvent,
};
use crate::UserId;

/// A record's id: a UUID for security and WebSocket events, text for alerts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum RowId {
    Uuid(Uuid),
    Text(String),
}

#[derive(Debug, Clone)]
pub(crate) enum EventRow {
    Security {
        id: Uuid,
        user_id: Option<Uuid>,
        event_type: String,
        platform: Option<String>,
        details: String,
        ip_address: Option<IpAddr>,
        user_agent: Option<String>,
        created_at: SystemTime,
    },
    WebSocket {
        id: Uuid,
        user_id: Option<Uuid>,
        event_type: String,
        metadata: String,
        created_at: SystemTime,
    },
    Alert {
        id: String,
        level: AlertLevel,
        message: String,
        source: String,
        metadata: String,
        created_at: SystemTime,
    },
}

/// Serialized JSON holding no spare capacity, so `bytes()` is what it costs.
fn compact(value: &serde_json::Value) -> String {
    let mut text = value.to_string();
    text.shrink_to_fit();
    text
}

impl EventRow {
    /// Validates `event` and serializes its JSON once.
    pub(crate) fn new(event: Event) -> Result<Self, EventLogError> {
        event.validate()?;
        Ok(match event {
            Event::Security(e) => EventRow::Security {
                id: e.id,
                user_id: e.user_id.map(|u| u.as_uuid()),
                details: compact(&e.details),
                event_type: e.event_type,
                platform: e.platform,
                ip_address: e.ip_address,
                user_agent: e.user_agent,
                created_at: e.created_at,
            },
            Event::WebSocket(e) => EventRow::WebSocket {
                id: e.id,
                user_id: e.user_id.map(|u| u.as_uuid()),
                metadata: compact(&e.metadata),
                event_type: e.event_type,
                created_at: e.created_at,
            },
            Event::Alert(e) => EventRow::Alert {
                metadata: compact(&e.metadata),
                id: e.id,
                level: e.level,
                message: e.message,
                source: e.source,
                created_at: e.created_at,
            },
        })
    }

    pub(crate) fn kind(&self) -> EventKind {
        match self {
            EventRow::Security { .. } => EventKind::Security,
            EventRow::WebSocket { .. } => EventKind::WebSocket,
            EventRow::Alert { .. } => EventKind::Alert,
        }
    }

    pub(crate) fn id(&self) -> RowId {
        match self {
            EventRow::Security { id, .. } | EventRow::WebSocket { id, .. } => RowId::Uuid(*id),
            EventRow::Alert { id, .. } => RowId::Text(id.clone()),
        }
    }

    pub(crate) fn created_at(&self) -> SystemTime {
        match self {
            EventRow::Security { created_at, .. }
            | EventRow::WebSocket { created_at, .. }
            | EventRow::Alert { created_at, .. } => *created_at,
        }
    }

    /// The id as text, the tie-breaker of the newest-first order.
    pub(crate) fn id_string(&self) -> String {
        match self {
            EventRow::Security { id, .. } | EventRow::WebSocket { id, .. } => id.to_string(),
            EventRow::Alert { id, .. } => id.clone(),
        }
    }

    /// `event_type`, or the alert's source.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn name(&self) -> &str {
        match self {
            EventRow::Security { event_type, .. } | EventRow::WebSocket { event_type, .. } => {
                event_type
            }
            EventRow::Alert { source, .. } => source,
        }
    }

    /// The heap and inline bytes this row holds.
    pub(crate) fn bytes(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::capacity);
        std::mem::size_of::<Self>()
            + match self {
                EventRow::Security {
                    event_type,
                    platform,
                    details,
                    user_agent,
                    ..
                } => event_type.capacity() + opt(platform) + details.capacity() + opt(user_agent),
                EventRow::WebSocket {
                    event_type,
                    metadata,
                    ..
                } => event_type.capacity() + metadata.capacity(),
                EventRow::Alert {
                    id,
                    message,
                    source,
                    metadata,
                    ..
                } => id.capacity() + message.capacity() + source.capacity() + metadata.capacity(),
            }
    }

    /// Back to an [`Event`]; the JSON was made by `serde_json`, so it parses.
    pub(crate) fn to_event(&self) -> Event {
        let parse = |text: &str| serde_json::from_str(text).unwrap_or(serde_json::Value::Null);
        match self {
            EventRow::Security {
                id,
                user_id,
                event_type,
                platform,
                details,
                ip_address,
                user_agent,
                created_at,
            } => Event::Security(SecurityEvent {
                id: *id,
                user_id: user_id.map(UserId::from_uuid),
                event_type: event_type.clone(),
                platform: platform.clone(),
                details: parse(details),
                ip_address: *ip_address,
                user_agent: user_agent.clone(),
                created_at: *created_at,
            }),
            EventRow::WebSocket {
                id,
                user_id,
                event_type,
                metadata,
                created_at,
            } => Event::WebSocket(WebSocketEvent {
                id: *id,
                user_id: user_id.map(UserId::from_uuid),
                event_type: event_type.clone(),
                metadata: parse(metadata),
                created_at: *created_at,
            }),
            EventRow::Alert {
                id,
                level,
                message,
                source,
                metadata,
                created_at,
            } => Event::Alert(SystemAlert {
                id: id.clone(),
                level: *level,
                message: message.clone(),
                source: source.clone(),
                metadata: parse(metadata),
                created_at: *created_at,
            }),
        }
    }
}
