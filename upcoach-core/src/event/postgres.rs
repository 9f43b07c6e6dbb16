//! [`PgEventLog`]: records queued in memory (bounded) and written to Postgres in
//! batches by one background task, retried with backoff through outages.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use sqlx::Row;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use super::row::EventRow;
use super::{
    AlertLevel, Event, EventKind, EventLog, EventLogError, EventLogStats, EventTypeCount,
    MAX_RECENT,
};
use crate::postgres::MeteredPool;

const BACKEND: &str = "postgres";

/// Options of a [`PgEventLog`]; start from [`PgEventLog::builder`].
#[derive(Debug, Clone)]
pub struct PgEventLogBuilder {
    pool: MeteredPool,
    queue_capacity: usize,
    max_queued_bytes: usize,
    batch_size: usize,
    min_backoff: Duration,
    max_backoff: Duration,
}

impl PgEventLogBuilder {
    /// How many records may wait for the database (default 100,000). When full,
    /// [`EventLog::record`] refuses with [`EventLogError::QueueFull`], counts the drop
    /// and logs it.
    pub fn queue_capacity(mut self, records: usize) -> Self {
        self.queue_capacity = records.max(1);
        self
    }

    /// How many bytes the waiting records may hold (default 64 MiB), whatever their count.
    pub fn max_queued_bytes(mut self, bytes: usize) -> Self {
        self.max_queued_bytes = bytes.max(1);
        self
    }

    /// The most records written by one round of statements (default 500).
    pub fn batch_size(mut self, records: usize) -> Self {
        self.batch_size = records.clamp(1, 10_000);
        self
    }

    /// The first and the longest wait between retries while the database fails
    /// (defaults 50 ms and 5 s; doubling, with jitter).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min.max(Duration::from_millis(1));
        self.max_backoff = max.max(self.min_backoff);
        self
    }

    /// Starts the writer task on the current Tokio runtime.
    pub fn build(self) -> PgEventLog {
        let (tx, rx) = mpsc::channel(self.queue_capacity);
        let shared = Arc::new(Shared::default());
        let writer = Writer {
            pool: self.pool.clone(),
            rx,
            shared: shared.clone(),
            batch_size: self.batch_size,
            min_backoff: self.min_backoff,
            max_backoff: self.max_backoff,
        };
        tokio::spawn(writer.run());
        PgEventLog {
            pool: self.pool,
            tx,
            shared,
            queue_capacity: self.queue_capacity,
            max_queued_bytes: self.max_queued_bytes,
        }
    }
}

/// The Postgres event log: `record` queues, a background task writes.
///
/// - **Bounded**: at most `queue_capacity` records and `max_queued_bytes` bytes wait;
///   past that a record is refused with [`EventLogError::QueueFull`], counted in
///   [`EventLogStats::dropped`], and logged (at most one warning per 10 s, with the count).
/// - **Outages**: a failed batch is retried with exponential backoff until it is
///   written; the queue holds what arrives meanwhile. Retries cannot make duplicates:
///   every record has its own id and rows are inserted with `ON CONFLICT DO NOTHING`.
/// - **Bad rows**: a batch the database refuses as a data error is written record by
///   record; a record refused alone is counted in [`EventLogStats::rejected`] and logged.
///
/// ```no_run
/// use upcoach_core::event::{EventLog, PgEventLog, SecurityEvent};
/// use upcoach_core::SystemClock;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = upcoach_core::postgres::MeteredPool::new(
///     sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?,
/// );
/// upcoach_core::postgres::migrate(pool.inner()).await?;
/// let log = PgEventLog::builder(pool.clone()).queue_capacity(50_000).build();
/// log.record(SecurityEvent::new("login_succeeded", &SystemClock).into())?;
/// log.flush().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgEventLog {
    pool: MeteredPool,
    tx: mpsc::Sender<Message>,
    shared: Arc<Shared>,
    queue_capacity: usize,
    max_queued_bytes: usize,
}

#[derive(Debug)]
enum Message {
    Event(EventRow, usize),
    Flush(oneshot::Sender<()>),
}

#[derive(Debug, Default)]
struct Shared {
    accepted: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    rejected: AtomicU64,
    retries: AtomicU64,
    queued: AtomicU64,
    queued_bytes: AtomicUsize,
    /// Drops not yet in a log line.
    pending_drops: AtomicU64,
    /// When the last drop report was logged.
    last_drop_report: Mutex<Option<Instant>>,
}

impl PgEventLog {
    /// Options for a log writing through `pool` (which must have had
    /// [`migrate`](crate::postgres::migrate) run on it), shared with the other stores.
    pub fn builder(pool: MeteredPool) -> PgEventLogBuilder {
        PgEventLogBuilder {
            pool,
            queue_capacity: 100_000,
            max_queued_bytes: 64 * 1024 * 1024,
            batch_size: 500,
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
        }
    }

    /// A log with the default options.
    pub fn new(pool: MeteredPool) -> Self {
        Self::builder(pool).build()
    }

    fn drop_event(&self, row: &EventRow) -> EventLogError {
        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        self.shared.pending_drops.fetch_add(1, Ordering::Relaxed);
        self.shared.report_drops(false, Some(row));
        EventLogError::QueueFull {
            capacity: self.queue_capacity,
            max_bytes: self.max_queued_bytes,
        }
    }
}

impl Shared {
    /// Logs the drops not yet reported: at once when `now` (the writer made progress),
    /// otherwise at most once per 10 s. Every drop is in some log line eventually: the
    /// writer calls this after each batch and on each retry.
    fn report_drops(&self, now: bool, latest: Option<&EventRow>) {
        if self.pending_drops.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut last = self
            .last_drop_report
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let due = now || last.is_none_or(|at| at.elapsed() >= Duration::from_secs(10));
        if !due {
            return;
        }
        let dropped = self.pending_drops.swap(0, Ordering::Relaxed);
        if dropped == 0 {
            return;
        }
        *last = Some(Instant::now());
        tracing::warn!(
            dropped,
            total_dropped = self.dropped.load(Ordering::Relaxed),
            latest_kind = ?latest.map(EventRow::kind),
            latest_event = latest.map(EventRow::name),
            "event log queue is full (Postgres slow or down): audit events were dropped"
        );
    }
}

#[async_trait]
impl EventLog for PgEventLog {
    fn record(&self, event: Event) -> Result<(), EventLogError> {
        let row = EventRow::new(event)?;
        let bytes = row.bytes();
        let before = self.shared.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > self.max_queued_bytes {
            self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            return Err(self.drop_event(&row));
        }
        // Count before sending, so the writer never takes away what was not added.
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Message::Event(row, bytes)) {
            Ok(()) => {
                self.shared.accepted.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                match e {
                    mpsc::error::TrySendError::Full(Message::Event(row, _)) => {
                        Err(self.drop_event(&row))
                    }
                    _ => Err(EventLogError::Closed),
                }
            }
        }
    }

    async fn flush(&self) -> Result<(), EventLogError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Message::Flush(done))
            .await
            .map_err(|_| EventLogError::Closed)?;
        wait.await.map_err(|_| EventLogError::Closed)
    }

    async fn recent(&self, kind: EventKind, limit: usize) -> Result<Vec<Event>, EventLogError> {
        let limit = limit.min(MAX_RECENT) as i64;
        let sql = match kind {
            EventKind::Security => {
                "SELECT id, user_id, event_type, platform, details::text AS details, \
                 host(ip_address) AS ip_address, user_agent, created_at FROM security_events \
                 ORDER BY created_at DESC, id DESC LIMIT $1"
            }
            EventKind::WebSocket => {
                "SELECT id, user_id, event_type, metadata::text AS metadata, created_at \
                 FROM websocket_events ORDER BY created_at DESC, id DESC LIMIT $1"
            }
            EventKind::Alert => {
                "SELECT id, level, message, source, metadata::text AS metadata, created_at \
                 FROM system_alerts ORDER BY created_at DESC, id COLLATE \"C\" DESC LIMIT $1"
            }
        };
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let rows = sqlx::query(sql)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await
            .map_err(backend)?;
        rows.iter().map(|row| decode(kind, row)).collect()
    }

    async fn security_event_counts(
        &self,
        since: SystemTime,
    ) -> Result<Vec<EventTypeCount>, EventLogError> {
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        let rows = sqlx::query(
            "SELECT event_type, count(*) AS n FROM security_events WHERE created_at >= $1 \
             GROUP BY event_type ORDER BY n DESC, event_type COLLATE \"C\"",
        )
        .bind(timestamp(since))
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
        rows.iter()
            .map(|row| {
                Ok(EventTypeCount {
                    event_type: row.try_get("event_type").map_err(backend)?,
                    count: u64::try_from(row.try_get::<i64, _>("n").map_err(backend)?).unwrap_or(0),
                })
            })
            .collect()
    }

    fn stats(&self) -> EventLogStats {
        let s = &self.shared;
        EventLogStats {
            accepted: s.accepted.load(Ordering::Relaxed),
            written: s.written.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
            evicted: 0,
            queued: s.queued.load(Ordering::Relaxed),
            retries: s.retries.load(Ordering::Relaxed),
        }
    }
}

fn backend(e: sqlx::Error) -> EventLogError {
    EventLogError::Backend {
        backend: BACKEND,
        source: Box::new(e),
    }
}

fn decode(kind: EventKind, row: &sqlx::postgres::PgRow) -> Result<Event, EventLogError> {
    fn get<'r, T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(
        row: &'r sqlx::postgres::PgRow,
        column: &str,
    ) -> Result<T, EventLogError> {
        row.try_get(column).map_err(backend)
    }
    let corrupt = |what: String| EventLogError::Backend {
        backend: BACKEND,
        source: what.into(),
    };
    let created_at = SystemTime::from(get::<OffsetDateTime>(row, "created_at")?);
    let stored = match kind {
        EventKind::Security => EventRow::Security {
            id: get(row, "id")?,
            user_id: get(row, "user_id")?,
            event_type: get(row, "event_type")?,
            platform: get(row, "platform")?,
            details: get(row, "details")?,
            ip_address: get::<Option<String>>(row, "ip_address")?
                .map(|ip| {
                    ip.parse::<IpAddr>()
                        .map_err(|_| corrupt(format!("bad address {ip:?}")))
                })
                .transpose()?,
            user_agent: get(row, "user_agent")?,
            created_at,
        },
        EventKind::WebSocket => EventRow::WebSocket {
            id: get(row, "id")?,
            user_id: get(row, "user_id")?,
            event_type: get(row, "event_type")?,
            metadata: get(row, "metadata")?,
            created_at,
        },
        EventKind::Alert => {
            let level: String = get(row, "level")?;
            EventRow::Alert {
                id: get(row, "id")?,
                level: AlertLevel::parse(&level).ok_or_else(|| {
                    corrupt(format!("unknown alert level {level:?} in system_alerts"))
                })?,
                message: get(row, "message")?,
                source: get(row, "source")?,
                metadata: get(row, "metadata")?,
                created_at,
            }
        }
    };
    Ok(stored.to_event())
}

/// The background task that drains the queue into Postgres.
struct Writer {
    pool: MeteredPool,
    rx: mpsc::Receiver<Message>,
    shared: Arc<Shared>,
    batch_size: usize,
    min_backoff: Duration,
    max_backoff: Duration,
}

impl Writer {
    async fn run(mut self) {
        let mut batch: Vec<(EventRow, usize)> = Vec::with_capacity(self.batch_size);
        let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
        while let Some(first) = self.rx.recv().await {
            self.take(first, &mut batch, &mut flushes);
            while batch.len() < self.batch_size {
                match self.rx.try_recv() {
                    Ok(message) => self.take(message, &mut batch, &mut flushes),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.write_until_done(&mut batch).await;
            }
            self.shared.report_drops(true, None);
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
        tracing::debug!("event log writer stopped: every sender is gone");
    }

    fn take(
        &self,
        message: Message,
        batch: &mut Vec<(EventRow, usize)>,
        flushes: &mut Vec<oneshot::Sender<()>>,
    ) {
        match message {
            Message::Event(event, bytes) => batch.push((event, bytes)),
            Message::Flush(done) => flushes.push(done),
        }
    }

    /// Writes `batch` (emptying it), retrying through outages.
    async fn write_until_done(&self, batch: &mut Vec<(EventRow, usize)>) {
        let mut backoff = self.min_backoff;
        let mut failures = 0u64;
        while !batch.is_empty() {
            let events: Vec<&EventRow> = batch.iter().map(|(e, _)| e).collect();
            let result = insert(&self.pool, &events).await;
            match result {
                Ok(()) => {
                    let n = batch.len() as u64;
                    self.done(batch.drain(..), n, 0);
                }
                Err(e) if is_data_error(&e) => {
                    // One bad record must not hold up the rest: write them one by one.
                    let mut keep = Vec::new();
                    for (event, bytes) in batch.drain(..) {
                        if !keep.is_empty() {
                            keep.push((event, bytes));
                            continue;
                        }
                        match insert(&self.pool, &[&event]).await {
                            Ok(()) => self.done(std::iter::once((event, bytes)), 1, 0),
                            Err(e) if is_data_error(&e) => {
                                tracing::error!(
                                    error = %e,
                                    kind = ?event.kind(),
                                    event = event.name(),
                                    id = ?event.id(),
                                    "Postgres refused an audit event; it was not stored"
                                );
                                self.done(std::iter::once((event, bytes)), 0, 1);
                            }
                            Err(_) => keep.push((event, bytes)),
                        }
                    }
                    *batch = keep;
                }
                Err(e) => {
                    failures += 1;
                    self.shared.retries.fetch_add(1, Ordering::Relaxed);
                    if failures == 1 {
                        tracing::warn!(
                            error = %e,
                            batch = batch.len(),
                            queued = self.shared.queued.load(Ordering::Relaxed),
                            "event log: writing to Postgres failed; retrying with backoff, events stay queued"
                        );
                    } else {
                        tracing::debug!(error = %e, failures, "event log: retry failed");
                    }
                    self.shared.report_drops(false, None);
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(self.max_backoff);
                }
            }
        }
        if failures > 0 {
            tracing::info!(failures, "event log: Postgres writes resumed");
        }
    }

    fn done(&self, events: impl Iterator<Item = (EventRow, usize)>, written: u64, rejected: u64) {
        let (count, bytes) = events.fold((0u64, 0usize), |(c, b), (_, bytes)| (c + 1, b + bytes));
        self.shared.queued.fetch_sub(count, Ordering::Relaxed);
        self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.shared.written.fetch_add(written, Ordering::Relaxed);
        self.shared.rejected.fetch_add(rejected, Ordering::Relaxed);
    }
}

/// Postgres refused the data itself (SQLSTATE class 22 or 23): retrying cannot help.
fn is_data_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
        _ => false,
    }
}

/// A wait between `d / 2` and `d`, so writers on many processes do not retry in step.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let fraction = 0.5 + f64::from(nanos % 1_000) / 2_000.0;
    d.mul_f64(fraction)
}

/// A `SystemTime` as Postgres `timestamptz`, clamped to what `time` can hold (records
/// are validated to 1970..9999 before they get here; `since` arguments may be anything).
fn timestamp(t: SystemTime) -> OffsetDateTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros())
            .ok()
            .and_then(|micros| {
                OffsetDateTime::UNIX_EPOCH.checked_add(time::Duration::microseconds(micros))
            })
            .unwrap_or(OffsetDateTime::UNIX_EPOCH + time::Duration::days(365 * 8000)),
        Err(_) => OffsetDateTime::UNIX_EPOCH,
    }
}

/// Inserts `rows` with one statement per kind present (UNNEST of arrays, so the
/// statement is the same whatever the batch size). Idempotent by id.
async fn insert(pool: &MeteredPool, rows: &[&EventRow]) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;

    let mut s_id = Vec::new();
    let mut s_user = Vec::new();
    let mut s_type = Vec::new();
    let mut s_platform = Vec::new();
    let mut s_details = Vec::new();
    let mut s_ip = Vec::new();
    let mut s_agent = Vec::new();
    let mut s_at = Vec::new();
    let mut w_id = Vec::new();
    let mut w_user = Vec::new();
    let mut w_type = Vec::new();
    let mut w_meta = Vec::new();
    let mut w_at = Vec::new();
    let mut a_id = Vec::new();
    let mut a_level = Vec::new();
    let mut a_message = Vec::new();
    let mut a_source = Vec::new();
    let mut a_meta = Vec::new();
    let mut a_at = Vec::new();
    for row in rows {
        match row {
            EventRow::Security {
                id,
                user_id,
                event_type,
                platform,
                details,
                ip_address,
                user_agent,
                created_at,
            } => {
                s_id.push(*id);
                s_user.push(*user_id);
                s_type.push(event_type.as_str());
                s_platform.push(platform.as_deref());
                s_details.push(details.as_str());
                s_ip.push(ip_address.map(|ip| ip.to_string()));
                s_agent.push(user_agent.as_deref());
                s_at.push(timestamp(*created_at));
            }
            EventRow::WebSocket {
                id,
                user_id,
                event_type,
                metadata,
                created_at,
            } => {
                w_id.push(*id);
                w_user.push(*user_id);
                w_type.push(event_type.as_str());
                w_meta.push(metadata.as_str());
                w_at.push(timestamp(*created_at));
            }
            EventRow::Alert {
                id,
                level,
                message,
                source,
                metadata,
                created_at,
            } => {
                a_id.push(id.as_str());
                a_level.push(level.as_str());
                a_message.push(message.as_str());
                a_source.push(source.as_str());
                a_meta.push(metadata.as_str());
                a_at.push(timestamp(*created_at));
            }
        }
    }

    if !s_id.is_empty() {
        sqlx::query(
            "INSERT INTO security_events \
             (id, user_id, event_type, platform, details, ip_address, user_agent, created_at) \
             SELECT id, user_id, event_type, platform, details::jsonb, ip_address::inet, user_agent, created_at \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::timestamptz[]) \
             AS t(id, user_id, event_type, platform, details, ip_address, user_agent, created_at) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(s_id)
        .bind(s_user)
        .bind(s_type)
        .bind(s_platform)
        .bind(s_details)
        .bind(s_ip)
        .bind(s_agent)
        .bind(s_at)
        .execute(&mut *conn)
        .await?;
    }
    if !w_id.is_empty() {
        sqlx::query(
            "INSERT INTO websocket_events (id, user_id, event_type, metadata, created_at) \
             SELECT id, user_id, event_type, metadata::jsonb, created_at \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[]) \
             AS t(id, user_id, event_type, metadata, created_at) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(w_id)
        .bind(w_user)
        .bind(w_type)
        .bind(w_meta)
        .bind(w_at)
        .execute(&mut *conn)
        .await?;
    }
    if !a_id.is_empty() {
        sqlx::query(
            "INSERT INTO system_alerts (id, level, message, source, metadata, created_at) \
             SELECT id, level, message, source, metadata::jsonb, created_at \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[]) \
             AS t(id, level, message, source, metadata, created_at) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(a_id)
        .bind(a_level)
        .bind(a_message)
        .bind(a_source)
        .bind(a_meta)
        .bind(a_at)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
