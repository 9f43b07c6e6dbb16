//! [`MemoryEventLog`]: the newest records of each kind in a ring buffer.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;

use super::row::{EventRow, RowId};
use super::{Event, EventKind, EventLog, EventLogError, EventLogStats, EventTypeCount, MAX_RECENT};

/// Keeps the newest records of each kind in memory, bounded by count and by bytes.
///
/// When a kind's buffer is full (by default 10,000 records or 16 MiB, whichever comes
/// first) its oldest records are pushed out and counted in [`EventLogStats::evicted`].
/// Records are kept compact (JSON serialized), so the byte bound is what they hold.
/// A record whose id is already held is not stored twice. Nothing survives a restart.
/// This is the embedded default of the reference server and the twin of `PgEventLog`
/// in the conformance suite.
#[derive(Debug)]
pub struct MemoryEventLog {
    capacity: usize,
    max_bytes: usize,
    buffers: [Mutex<Buffer>; 3],
    accepted: AtomicU64,
    evicted: AtomicU64,
}

#[derive(Debug, Default)]
struct Buffer {
    rows: VecDeque<EventRow>,
    ids: HashSet<RowId>,
    bytes: usize,
}

impl MemoryEventLog {
    /// A log keeping the newest `capacity` records of each kind (at least 1), and at most
    /// 16 MiB of them per kind.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            max_bytes: 16 * 1024 * 1024,
            buffers: std::array::from_fn(|_| Mutex::new(Buffer::default())),
            accepted: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    /// Sets the most bytes kept per kind (the newest record is always kept).
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes;
        self
    }

    fn buffer(&self, kind: EventKind) -> std::sync::MutexGuard<'_, Buffer> {
        let index = match kind {
            EventKind::Security => 0,
            EventKind::WebSocket => 1,
            EventKind::Alert => 2,
        };
        // Every critical section below leaves the buffer whole, so a poisoned lock is
        // still consistent.
        self.buffers[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for MemoryEventLog {
    /// 10,000 records or 16 MiB of each kind.
    fn default() -> Self {
        Self::new(10_000)
    }
}

#[async_trait]
impl EventLog for MemoryEventLog {
    fn record(&self, event: Event) -> Result<(), EventLogError> {
        let row = EventRow::new(event)?;
        let id = row.id();
        let bytes = row.bytes();
        let mut buffer = self.buffer(row.kind());
        self.accepted.fetch_add(1, Ordering::Relaxed);
        if buffer.ids.contains(&id) {
            return Ok(());
        }
        while !buffer.rows.is_empty()
            && (buffer.rows.len() >= self.capacity || buffer.bytes + bytes > self.max_bytes)
        {
            if let Some(old) = buffer.rows.pop_front() {
                buffer.bytes -= old.bytes();
                buffer.ids.remove(&old.id());
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        buffer.bytes += bytes;
        buffer.ids.insert(id);
        buffer.rows.push_back(row);
        Ok(())
    }

    async fn flush(&self) -> Result<(), EventLogError> {
        Ok(())
    }

    async fn recent(&self, kind: EventKind, limit: usize) -> Result<Vec<Event>, EventLogError> {
        let buffer = self.buffer(kind);
        let mut rows: Vec<&EventRow> = buffer.rows.iter().collect();
        rows.sort_by_cached_key(|r| std::cmp::Reverse((r.created_at(), r.id_string())));
        Ok(rows
            .into_iter()
            .take(limit.min(MAX_RECENT))
            .map(EventRow::to_event)
            .collect())
    }

    async fn security_event_counts(
        &self,
        since: SystemTime,
    ) -> Result<Vec<EventTypeCount>, EventLogError> {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for row in self.buffer(EventKind::Security).rows.iter() {
            if let EventRow::Security {
                event_type,
                created_at,
                ..
            } = row
                && *created_at >= since
            {
                *counts.entry(event_type.clone()).or_default() += 1;
            }
        }
        let mut out: Vec<EventTypeCount> = counts
            .into_iter()
            .map(|(event_type, count)| EventTypeCount { event_type, count })
            .collect();
        out.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| a.event_type.cmp(&b.event_type))
        });
        Ok(out)
    }

    fn stats(&self) -> EventLogStats {
        let accepted = self.accepted.load(Ordering::Relaxed);
        EventLogStats {
            accepted,
            written: accepted,
            evicted: self.evicted.load(Ordering::Relaxed),
            ..EventLogStats::default()
        }
    }
}
