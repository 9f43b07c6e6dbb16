//! [`MemoryEventLog`]: the newest records of each kind in a ring buffer.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;

use super::{
    Event, EventKind, EventLog, EventLogError, EventLogStats, EventTypeCount, newest_first,
};

/// Keeps the newest `capacity` records of each kind in memory.
///
/// When a kind's buffer is full the oldest record of that kind is pushed out and counted
/// in [`EventLogStats::evicted`]; nothing survives a restart. This is the embedded
/// default of the reference server and the twin of `PgEventLog` in the conformance
/// suite.
#[derive(Debug)]
pub struct MemoryEventLog {
    capacity: usize,
    buffers: [Mutex<VecDeque<Event>>; 3],
    accepted: AtomicU64,
    evicted: AtomicU64,
}

impl MemoryEventLog {
    /// A log keeping the newest `capacity` records of each kind (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            buffers: std::array::from_fn(|_| Mutex::new(VecDeque::new())),
            accepted: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    fn buffer(&self, kind: EventKind) -> std::sync::MutexGuard<'_, VecDeque<Event>> {
        let index = match kind {
            EventKind::Security => 0,
            EventKind::WebSocket => 1,
            EventKind::Alert => 2,
        };
        // Every critical section below leaves the deque whole, so a poisoned lock is
        // still consistent.
        self.buffers[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for MemoryEventLog {
    /// 10,000 records of each kind.
    fn default() -> Self {
        Self::new(10_000)
    }
}

#[async_trait]
impl EventLog for MemoryEventLog {
    fn record(&self, event: Event) -> Result<(), EventLogError> {
        event.validate()?;
        let mut buffer = self.buffer(event.kind());
        if buffer.len() == self.capacity {
            buffer.pop_front();
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        buffer.push_back(event);
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn flush(&self) -> Result<(), EventLogError> {
        Ok(())
    }

    async fn recent(&self, kind: EventKind, limit: usize) -> Result<Vec<Event>, EventLogError> {
        let all: Vec<Event> = self.buffer(kind).iter().cloned().collect();
        Ok(newest_first(all, limit))
    }

    async fn security_event_counts(
        &self,
        since: SystemTime,
    ) -> Result<Vec<EventTypeCount>, EventLogError> {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for event in self.buffer(EventKind::Security).iter() {
            if let Event::Security(e) = event
                && e.created_at >= since
            {
                *counts.entry(e.event_type.clone()).or_default() += 1;
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
