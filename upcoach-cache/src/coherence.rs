//! Cross-process L1 coherence over Redis pub/sub: a delete, overwrite or tag
//! invalidation on one process evicts the stale L1 copies on every other.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

/// What one process tells the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Notice {
    /// This key changed or went away.
    Key(String),
    /// This tag is now at this version.
    Tag(String, u64),
}

impl Notice {
    fn encode(&self, origin: &str) -> String {
        match self {
            Notice::Key(key) => format!("{origin}|k|{key}"),
            Notice::Tag(tag, version) => format!("{origin}|t|{version}|{tag}"),
        }
    }

    /// `(origin, notice)`; `None` for anything malformed (ignored).
    fn decode(text: &str) -> Option<(&str, Notice)> {
        let (origin, rest) = text.split_once('|')?;
        let (kind, rest) = rest.split_once('|')?;
        match kind {
            "k" => Some((origin, Notice::Key(rest.to_owned()))),
            "t" => {
                let (version, tag) = rest.split_once('|')?;
                Some((origin, Notice::Tag(tag.to_owned(), version.parse().ok()?)))
            }
            _ => None,
        }
    }
}

/// What the subscriber does with notices from other processes.
pub(crate) trait Apply: Send + Sync + 'static {
    /// Another process changed something.
    fn apply(&self, notice: Notice);
    /// The subscription was (re)established: anything may have been missed.
    fn resynced(&self);
}

/// Publishes this process's notices and applies the others'.
#[derive(Debug)]
pub(crate) struct Coherence {
    origin: String,
    outbox: mpsc::Sender<String>,
    /// Notices that never reached the channel: the outbox was full, or PUBLISH failed.
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

/// Notices waiting to be published; past this they are dropped (the L1 maximum age
/// heals what a lost notice leaves behind) and counted.
const OUTBOX: usize = 4096;

impl Coherence {
    /// Starts the publisher and the subscriber (which reconnects by itself) on the
    /// current Tokio runtime.
    pub(crate) fn start(
        source: upcoach_core::redis::PubSubSource,
        publisher: upcoach_core::redis::RedisConnection,
        channel: String,
        target: Weak<dyn Apply>,
        ping_every: Duration,
    ) -> Arc<Self> {
        let origin = uuid::Uuid::new_v4().simple().to_string();
        let (outbox, mut rx) = mpsc::channel::<String>(OUTBOX);
        let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        {
            let channel = channel.clone();
            let dropped = dropped.clone();
            let mut conn = publisher;
            tokio::spawn(async move {
                while let Some(message) = rx.recv().await {
                    let sent: redis::RedisResult<u64> = redis::cmd("PUBLISH")
                        .arg(&channel)
                        .arg(message)
                        .query_async(&mut conn)
                        .await;
                    if let Err(e) = sent {
                        dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::debug!(error = %e, "cache invalidation notice not published");
                    }
                }
            });
        }
        tokio::spawn(subscribe(
            source,
            channel,
            target,
            origin.clone(),
            ping_every,
        ));
        Arc::new(Self {
            origin,
            outbox,
            dropped,
        })
    }

    /// Notices that never reached the other processes.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tells the other processes, without waiting.
    pub(crate) fn publish(&self, notice: Notice) {
        if self.outbox.try_send(notice.encode(&self.origin)).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// How long a liveness ping may go unanswered.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Applies the other processes' notices to `target` until it is gone: subscribes,
/// empties L1 on every (re)subscription, pings every `ping_every` so that a connection
/// that went silent without closing is replaced, and reconnects with backoff.
async fn subscribe(
    source: upcoach_core::redis::PubSubSource,
    channel: String,
    target: Weak<dyn Apply>,
    origin: String,
    ping_every: Duration,
) {
    let mut backoff = Duration::from_millis(100);
    while target.strong_count() > 0 {
        let session = async {
            let pubsub = tokio::time::timeout(PING_TIMEOUT, source.open())
                .await
                .map_err(|_| "connect timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            let (mut sink, stream) = pubsub.split();
            tokio::time::timeout(PING_TIMEOUT, sink.subscribe(&channel))
                .await
                .map_err(|_| "subscribe timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((sink, stream))
        }
        .await;
        let (mut sink, mut stream) = match session {
            Ok(parts) => parts,
            Err(e) => {
                tracing::debug!(error = %e, "cache invalidation subscribe failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let Some(live) = target.upgrade() else { return };
        live.resynced();
        drop(live);

        let mut ping = tokio::time::interval(ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let why = loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else { break "the connection closed" };
                    let Ok(text) = std::str::from_utf8(message.get_payload_bytes()) else {
                        continue;
                    };
                    let Some(live) = target.upgrade() else { return };
                    if let Some((from, notice)) = Notice::decode(text)
                        && from != origin
                    {
                        live.apply(notice);
                    }
                }
                _ = ping.tick() => {
                    if target.strong_count() == 0 {
                        return;
                    }
                    // Any reply will do: a subscribed RESP2 connection answers
                    // `["pong", ""]`, not `PONG`.
                    let alive = tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break "a ping went unanswered";
                    }
                }
            }
        };
        tracing::warn!(
            reason = why,
            "cache invalidation subscription lost; resubscribing"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_and_junk_is_ignored() {
        for notice in [
            Notice::Key("a|b:c".into()),
            Notice::Tag("analytics|x".into(), 42),
        ] {
            let text = notice.encode("me");
            assert_eq!(Notice::decode(&text), Some(("me", notice)));
        }
        for junk in ["", "x", "me|z|1", "me|t|notanumber|tag", "me|t|5"] {
            assert_eq!(Notice::decode(junk), None, "{junk:?}");
        }
    }
}
