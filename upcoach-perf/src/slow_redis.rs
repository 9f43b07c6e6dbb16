//! The Redis copy of the slow-query list: `LPUSH` + `LTRIM` from a background task fed
//! by a bounded queue, so a `tracing` callback never waits on the network.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

/// Entries waiting for Redis; past this, entries are dropped and counted.
const QUEUE: usize = 1024;

#[derive(Debug)]
pub(crate) struct RedisSlowList {
    tx: mpsc::Sender<String>,
    /// Entries that never reached Redis: the queue was full, or the write failed.
    skipped: Arc<AtomicU64>,
}

impl RedisSlowList {
    /// Starts the writer task on the current Tokio runtime.
    pub(crate) fn start(
        mut redis: upcoach_core::redis::RedisConnection,
        key: String,
        max_len: usize,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        let keep = max_len.max(1) as isize - 1;
        let skipped = Arc::new(AtomicU64::new(0));
        let task_skipped = skipped.clone();
        tokio::spawn(async move {
            let mut failing = false;
            while let Some(entry) = rx.recv().await {
                let result: redis::RedisResult<()> = redis::pipe()
                    .cmd("LPUSH")
                    .arg(&key)
                    .arg(entry)
                    .ignore()
                    .cmd("LTRIM")
                    .arg(&key)
                    .arg(0)
                    .arg(keep)
                    .ignore()
                    .query_async(&mut redis)
                    .await;
                if result.is_err() {
                    task_skipped.fetch_add(1, Ordering::Relaxed);
                }
                match result {
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "slow-query list: Redis write failed; entries are skipped until it works");
                    }
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("slow-query list: Redis writes resumed");
                    }
                    _ => {}
                }
            }
        });
        Self { tx, skipped }
    }

    /// Entries that never reached Redis.
    pub(crate) fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    pub(crate) fn push(&self, digest: &str, elapsed: Duration, at: SystemTime) {
        let entry = serde_json::json!({
            "digest": digest,
            "elapsed_ms": elapsed.as_secs_f64() * 1000.0,
            "at_ms": at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        });
        if self.tx.try_send(entry.to_string()).is_err() {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
