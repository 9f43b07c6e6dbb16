//! The audit event log: [`EventLog`] and its three kinds of record, kept in the
//! `security_events`, `websocket_events` and `system_alerts` tables.
//!
//! [`MemoryEventLog`] keeps the latest records in a ring buffer;
//! `PgEventLog` (feature `postgres`) batches them into Postgres from a bounded
//! queue. Recording never waits on I/O.
//!
//! ```
//! use upcoach_core::event::{EventKind, EventLog, MemoryEventLog, SecurityEvent};
//! use upcoach_core::{SystemClock, UserId};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let log = MemoryEventLog::new(1_000);
//! log.record(
//!     SecurityEvent::new("login_succeeded", &SystemClock)
//!         .user(UserId::new())
//!         .platform("web")
//!         .details(serde_json::json!({ "provider": "google" }))
//!         .into(),
//! )?;
//! let recent = log.recent(EventKind::Security, 10).await?;
//! assert_eq!(recent.len(), 1);
//! # Ok::<(), upcoach_core::event::EventLogError>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Clock, UserId};

mod aggregate;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod row;

pub use aggregate::{AggregateConfig, AggregatingLog};
pub use memory::MemoryEventLog;
#[cfg(feature = "postgres")]
pub use postgres::{PgEventLog, PgEventLogBuilder};

/// The longest `event_type`, `source` or `platform`, in bytes.
pub const MAX_NAME_LEN: usize = 100;
/// The longest `message` or `user_agent`, in bytes.
pub const MAX_TEXT_LEN: usize = 4096;
/// The largest `details` / `metadata` JSON document, serialized, in bytes.
pub const MAX_JSON_LEN: usize = 16 * 1024;
/// The most records [`EventLog::recent`] returns, whatever the limit asked.
pub const MAX_RECENT: usize = 10_000;
/// 10000-01-01T00:00:00Z, the first instant a record may not carry.
const LATEST: Duration = Duration::from_secs(253_402_300_800);

/// Which table a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// `security_events`: sign-ins, failures, token reuse, rate limiting.
    Security,
    /// `websocket_events`: realtime connects, disconnects, refusals.
    WebSocket,
    /// `system_alerts`: alert transitions.
    Alert,
}

impl EventKind {
    /// Every kind, in table order.
    pub const ALL: [EventKind; 3] = [EventKind::Security, EventKind::WebSocket, EventKind::Alert];

    /// The table that holds this kind.
    pub fn table(self) -> &'static str {
        match self {
            EventKind::Security => "security_events",
            EventKind::WebSocket => "websocket_events",
            EventKind::Alert => "system_alerts",
        }
    }
}

/// A security-relevant happening: a sign-in, a refused token, a reused refresh token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecurityEvent {
    /// Unique id; retries of the same record never make two rows.
    pub id: Uuid,
    /// The user concerned, when known.
    pub user_id: Option<UserId>,
    /// What happened, as a stable snake_case name (`login_succeeded`).
    pub event_type: String,
    /// Where (`web`, `ios`, `android`), when known.
    pub platform: Option<String>,
    /// Structured detail; never tokens, secrets or passwords.
    pub details: serde_json::Value,
    /// The client's address, when known.
    pub ip_address: Option<IpAddr>,
    /// The client's user agent, when known.
    pub user_agent: Option<String>,
    /// When it happened (microsecond precision, as stored).
    pub created_at: SystemTime,
}

impl SecurityEvent {
    /// An event of `event_type` happening now by `clock`.
    pub fn new(event_type: impl Into<String>, clock: &dyn Clock) -> Self {
        Self {
            id: Uuid::now_v7(),
            user_id: None,
            event_type: event_type.into(),
            platform: None,
            details: serde_json::Value::Object(Default::default()),
            ip_address: None,
            user_agent: None,
            created_at: to_micros(clock.now()),
        }
    }

    /// Sets the user.
    pub fn user(mut self, user_id: UserId) -> Self {
        self.user_id = Some(user_id);
        self
    }

    /// Sets the platform.
    pub fn platform(mut self, platform: impl Into<String>) -> Self {
        self.platform = Some(platform.into());
        self
    }

    /// Sets the details.
    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }

    /// Sets the client's address.
    pub fn ip(mut self, ip: IpAddr) -> Self {
        self.ip_address = Some(ip);
        self
    }

    /// Sets the client's user agent.
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = Some(user_agent.into());
        self
    }

    /// Sets the client's address, user agent and platform, where `facts` knows them.
    pub fn client(mut self, facts: &ClientFacts) -> Self {
        if facts.ip.is_some() {
            self.ip_address = facts.ip;
        }
        if let Some(user_agent) = &facts.user_agent {
            self.user_agent = Some(user_agent.clone());
        }
        if let Some(platform) = &facts.platform {
            self.platform = Some(platform.clone());
        }
        self
    }
}

/// What a request says about its client, for the audit columns `ip_address`,
/// `user_agent` and `platform` (with feature `http`,
/// [`http::client_facts`](crate::http::client_facts) reads the first two off a request).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientFacts {
    /// The client's address, when the server knows it.
    pub ip: Option<IpAddr>,
    /// Its `User-Agent`.
    pub user_agent: Option<String>,
    /// Where it runs (`web`, `ios`, `android`), when it said so.
    pub platform: Option<String>,
}

impl ClientFacts {
    /// The same facts with `platform` set (or cleared).
    pub fn with_platform(mut self, platform: Option<String>) -> Self {
        self.platform = platform;
        self
    }
}

/// A realtime connection happening: connected, disconnected (with reason), refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebSocketEvent {
    /// Unique id; retries of the same record never make two rows.
    pub id: Uuid,
    /// The user concerned, when known.
    pub user_id: Option<UserId>,
    /// What happened (`connected`, `disconnected`, `auth_failed`, `subscribe_denied`).
    pub event_type: String,
    /// Structured detail (transport, room, close code, reason).
    pub metadata: serde_json::Value,
    /// When it happened (microsecond precision, as stored).
    pub created_at: SystemTime,
}

impl WebSocketEvent {
    /// An event of `event_type` happening now by `clock`.
    pub fn new(event_type: impl Into<String>, clock: &dyn Clock) -> Self {
        Self {
            id: Uuid::now_v7(),
            user_id: None,
            event_type: event_type.into(),
            metadata: serde_json::Value::Object(Default::default()),
            created_at: to_micros(clock.now()),
        }
    }

    /// Sets the user.
    pub fn user(mut self, user_id: UserId) -> Self {
        self.user_id = Some(user_id);
        self
    }

    /// Sets the metadata.
    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }
}

/// How serious an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertLevel {
    /// Worth knowing (a resolved alert).
    Info,
    /// Needs attention soon.
    Warning,
    /// Needs attention now.
    Critical,
}

impl AlertLevel {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertLevel::Info => "info",
            AlertLevel::Warning => "warning",
            AlertLevel::Critical => "critical",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "info" => Some(AlertLevel::Info),
            "warning" => Some(AlertLevel::Warning),
            "critical" => Some(AlertLevel::Critical),
            _ => None,
        }
    }
}

/// An alert transition (firing or resolved).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemAlert {
    /// Unique id of this transition; a second record with the same id is ignored.
    pub id: String,
    /// How serious.
    pub level: AlertLevel,
    /// What a person should read.
    pub message: String,
    /// Which component raised it (`perf`, `auth`).
    pub source: String,
    /// Structured detail (rule, value, threshold).
    pub metadata: serde_json::Value,
    /// When it happened (microsecond precision, as stored).
    pub created_at: SystemTime,
}

impl SystemAlert {
    /// An alert with a fresh id, happening now by `clock`.
    pub fn new(
        level: AlertLevel,
        source: impl Into<String>,
        message: impl Into<String>,
        clock: &dyn Clock,
    ) -> Self {
        Self {
            id: Uuid::now_v7().to_string(),
            level,
            message: message.into(),
            source: source.into(),
            metadata: serde_json::Value::Object(Default::default()),
            created_at: to_micros(clock.now()),
        }
    }

    /// Sets the metadata.
    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }
}

/// One record of any kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A `security_events` row.
    Security(SecurityEvent),
    /// A `websocket_events` row.
    WebSocket(WebSocketEvent),
    /// A `system_alerts` row.
    Alert(SystemAlert),
}

impl Event {
    /// Which table it belongs to.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Security(_) => EventKind::Security,
            Event::WebSocket(_) => EventKind::WebSocket,
            Event::Alert(_) => EventKind::Alert,
        }
    }

    /// When it happened.
    pub fn created_at(&self) -> SystemTime {
        match self {
            Event::Security(e) => e.created_at,
            Event::WebSocket(e) => e.created_at,
            Event::Alert(e) => e.created_at,
        }
    }

    /// Its id, as text (for ordering ties and logs).
    pub fn id_string(&self) -> String {
        match self {
            Event::Security(e) => e.id.to_string(),
            Event::WebSocket(e) => e.id.to_string(),
            Event::Alert(e) => e.id.clone(),
        }
    }

    /// What happened (`event_type`, or the alert's source for alerts).
    pub fn name(&self) -> &str {
        match self {
            Event::Security(e) => &e.event_type,
            Event::WebSocket(e) => &e.event_type,
            Event::Alert(e) => &e.source,
        }
    }

    /// Checks the limits every backend can store.
    ///
    /// Refused: empty names, names over [`MAX_NAME_LEN`], text over [`MAX_TEXT_LEN`],
    /// JSON over [`MAX_JSON_LEN`] (serialized), NUL characters anywhere (Postgres cannot
    /// store them in text or JSONB), and a `created_at` outside the years 1970 to 9999.
    pub fn validate(&self) -> Result<(), EventLogError> {
        fn invalid(reason: &'static str) -> EventLogError {
            EventLogError::InvalidEvent { reason }
        }
        fn name(value: &str, field: &'static str) -> Result<(), EventLogError> {
            if value.is_empty() {
                return Err(invalid(field_empty(field)));
            }
            text(value, MAX_NAME_LEN, field)
        }
        fn text(value: &str, max: usize, field: &'static str) -> Result<(), EventLogError> {
            if value.len() > max {
                return Err(invalid(too_long(field)));
            }
            if value.contains('\0') {
                return Err(invalid("a text field contains a NUL character"));
            }
            Ok(())
        }
        fn json(value: &serde_json::Value) -> Result<(), EventLogError> {
            let mut counter = ByteCounter(0);
            let len = match serde_json::to_writer(&mut counter, value) {
                Ok(()) => counter.0,
                Err(_) => usize::MAX,
            };
            if len > MAX_JSON_LEN {
                return Err(invalid("the JSON detail is larger than 16 KiB"));
            }
            if json_has_nul(value) {
                return Err(invalid("the JSON detail contains a NUL character"));
            }
            Ok(())
        }
        let opt =
            |v: &Option<String>, max, field| v.as_deref().map_or(Ok(()), |v| text(v, max, field));
        let created_at = self.created_at();
        if created_at < SystemTime::UNIX_EPOCH || created_at >= SystemTime::UNIX_EPOCH + LATEST {
            return Err(invalid("created_at is outside the years 1970 to 9999"));
        }
        match self {
            Event::Security(e) => {
                name(&e.event_type, "event_type")?;
                opt(&e.platform, MAX_NAME_LEN, "platform")?;
                opt(&e.user_agent, MAX_TEXT_LEN, "user_agent")?;
                json(&e.details)
            }
            Event::WebSocket(e) => {
                name(&e.event_type, "event_type")?;
                json(&e.metadata)
            }
            Event::Alert(e) => {
                name(&e.id, "id")?;
                name(&e.source, "source")?;
                text(&e.message, MAX_TEXT_LEN, "message")?;
                json(&e.metadata)
            }
        }
    }
}

fn field_empty(field: &'static str) -> &'static str {
    match field {
        "event_type" => "event_type is empty",
        "source" => "source is empty",
        _ => "id is empty",
    }
}

fn too_long(field: &'static str) -> &'static str {
    match field {
        "event_type" => "event_type is longer than 100 bytes",
        "platform" => "platform is longer than 100 bytes",
        "source" => "source is longer than 100 bytes",
        "id" => "id is longer than 100 bytes",
        "message" => "message is longer than 4096 bytes",
        _ => "user_agent is longer than 4096 bytes",
    }
}

/// Counts what would be written, to size JSON without building it.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn json_has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(json_has_nul),
        serde_json::Value::Object(map) => {
            map.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v))
        }
        _ => false,
    }
}

impl From<SecurityEvent> for Event {
    fn from(e: SecurityEvent) -> Self {
        Event::Security(e)
    }
}

impl From<WebSocketEvent> for Event {
    fn from(e: WebSocketEvent) -> Self {
        Event::WebSocket(e)
    }
}

impl From<SystemAlert> for Event {
    fn from(e: SystemAlert) -> Self {
        Event::Alert(e)
    }
}

/// How many security events of one type happened in a window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventTypeCount {
    /// The `event_type`.
    pub event_type: String,
    /// How many.
    pub count: u64,
}

/// What an event log has done so far; cheap to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLogStats {
    /// Records accepted by [`EventLog::record`].
    pub accepted: u64,
    /// Records stored by the backend.
    pub written: u64,
    /// Records refused because the queue was full.
    pub dropped: u64,
    /// Records the backend refused as data errors after they were accepted.
    pub rejected: u64,
    /// Records pushed out of a ring buffer by newer ones.
    pub evicted: u64,
    /// Records waiting to be written.
    pub queued: u64,
    /// Failed write attempts that were retried.
    pub retries: u64,
}

/// What can go wrong with an event log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventLogError {
    /// The record breaks a limit every backend shares; nothing was queued.
    #[error("invalid event: {reason}")]
    InvalidEvent {
        /// Which limit.
        reason: &'static str,
    },
    /// The bounded queue is full (the database has been slow or down for a while); the
    /// record was dropped, counted and logged.
    #[error(
        "the event log queue is full ({capacity} records or {max_bytes} bytes); the event was dropped"
    )]
    QueueFull {
        /// The queue's record capacity.
        capacity: usize,
        /// The queue's byte capacity.
        max_bytes: usize,
    },
    /// The writer has stopped (the runtime is shutting down).
    #[error("the event log writer has stopped")]
    Closed,
    /// A flush did not finish in time.
    #[error("the event log did not flush within {0:?}")]
    Timeout(Duration),
    /// The backend failed.
    #[error("{backend} event log failed")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl EventLogError {
    /// Whether trying again later could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            EventLogError::QueueFull { .. }
                | EventLogError::Timeout(_)
                | EventLogError::Backend { .. }
        )
    }
}

/// Where audit records go: `security_events`, `websocket_events` and `system_alerts`.
///
/// [`record`](EventLog::record) never waits on I/O: an implementation queues the record
/// (bounded) or stores it in memory, and says so when it cannot.
///
/// Implementing your own backend (this one forwards to `tracing` and keeps nothing):
///
/// ```
/// use std::time::SystemTime;
/// use async_trait::async_trait;
/// use upcoach_core::event::*;
///
/// #[derive(Debug, Default)]
/// struct TracingEventLog;
///
/// #[async_trait]
/// impl EventLog for TracingEventLog {
///     fn record(&self, event: Event) -> Result<(), EventLogError> {
///         event.validate()?;
///         tracing::info!(kind = ?event.kind(), name = event.name(), "audit event");
///         Ok(())
///     }
///     async fn flush(&self) -> Result<(), EventLogError> {
///         Ok(())
///     }
///     async fn recent(&self, _: EventKind, _: usize) -> Result<Vec<Event>, EventLogError> {
///         Ok(Vec::new())
///     }
///     async fn security_event_counts(
///         &self,
///         _since: SystemTime,
///     ) -> Result<Vec<EventTypeCount>, EventLogError> {
///         Ok(Vec::new())
///     }
///     fn stats(&self) -> EventLogStats {
///         EventLogStats::default()
///     }
/// }
/// ```
#[async_trait]
pub trait EventLog: fmt::Debug + Send + Sync + 'static {
    /// Accepts a record without waiting on I/O. A record whose id was recorded before
    /// is accepted and not stored twice.
    ///
    /// Fails with [`EventLogError::InvalidEvent`] for a record no backend can store and
    /// [`EventLogError::QueueFull`] when a bounded queue is full; either way the error
    /// says the record was not kept.
    fn record(&self, event: Event) -> Result<(), EventLogError>;

    /// Waits until every record accepted before the call is stored (or refused as a
    /// data error). Put a timeout around it: with the database down it waits.
    async fn flush(&self) -> Result<(), EventLogError>;

    /// The newest `limit` records of `kind` (at most [`MAX_RECENT`]), newest first (by
    /// `created_at`, then id).
    async fn recent(&self, kind: EventKind, limit: usize) -> Result<Vec<Event>, EventLogError>;

    /// Security events since `since` (inclusive), counted by `event_type`, most frequent
    /// first, ties by name.
    async fn security_event_counts(
        &self,
        since: SystemTime,
    ) -> Result<Vec<EventTypeCount>, EventLogError>;

    /// Counters of what the log has done.
    fn stats(&self) -> EventLogStats;
}

/// A window of the event log as people write it: `1h`, `30m`, `7d`, `90s`; at most 30
/// days. `None` for anything else.
///
/// ```
/// use std::time::Duration;
/// use upcoach_core::event::parse_window;
///
/// assert_eq!(parse_window("30m"), Some(Duration::from_secs(1800)));
/// assert_eq!(parse_window("31d"), None);
/// assert_eq!(parse_window("1 h"), None);
/// ```
pub fn parse_window(text: &str) -> Option<Duration> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = number.parse().ok().filter(|n| *n > 0)?;
    let seconds = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    (seconds <= 30 * 86_400).then(|| Duration::from_secs(seconds))
}

/// Security events of a window counted by type: `{"since_ms","counts":[...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityCounts {
    /// Where the window starts, milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// Counts by `event_type`, most frequent first.
    pub counts: Vec<EventTypeCount>,
}

/// The security events of `log` in the `window` up to `now`, counted by type.
pub async fn count_security_events(
    log: &dyn EventLog,
    window: Duration,
    now: SystemTime,
) -> Result<SecurityCounts, EventLogError> {
    let since = now.checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH);
    Ok(SecurityCounts {
        since_ms: since
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        counts: log.security_event_counts(since).await?,
    })
}

/// Truncates to whole microseconds, the precision every backend stores.
pub fn to_micros(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SystemTime::UNIX_EPOCH + Duration::from_micros(d.as_micros() as u64),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}
