//! [`RedisDetectorState`]: the detectors' windows and open alerts in Redis, shared by
//! every process.

use std::fmt;

use async_trait::async_trait;
use sha2::Digest;
use upcoach_core::redis::RedisConnection;

use super::state::{DetectorState, MAX_WINDOW_MEMBERS, Observation, StateError, Tally, millis};

const BACKEND: &str = "redis";

/// One observation, atomically: KEYS[1] is the window (a sorted set, member → ms),
/// KEYS[2] the open alert (its value: until when, in event-time ms).
/// ARGV: now ms, window ms, member, threshold, hold ms, cap.
const OBSERVE: &str = r#"
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local threshold = tonumber(ARGV[4])
local hold = tonumber(ARGV[5])
local cap = tonumber(ARGV[6])
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count > cap then
  redis.call('ZPOPMIN', KEYS[1], count - cap)
  count = cap
end
redis.call('PEXPIRE', KEYS[1], window)
if threshold == 0 or count < threshold then
  return {count, 0}
end
local open = tonumber(redis.call('GET', KEYS[2]) or '0')
if open > now then
  return {count, 0}
end
redis.call('SET', KEYS[2], now + hold, 'PX', math.max(hold, 1))
return {count, 1}
"#;

/// The detectors' state in Redis (5.0 or later), so every process of a deployment
/// counts one pattern together and alerts on it once.
///
/// - **One script per observation** (`EVAL`): `ZADD` the member with its time as score,
///   `ZREMRANGEBYSCORE` what left the window, `ZCARD`, trim to
///   [`MAX_WINDOW_MEMBERS`] with `ZPOPMIN`, `PEXPIRE` the window; and when the count
///   reaches the threshold, open the alert unless one is open (the open key holds until
///   when, so of two processes crossing the threshold together only one opens it: a
///   `SET NX PX` that also works on event time).
/// - **Time** is the event's `created_at`, not Redis's clock, so tests can move a
///   `ManualClock` and processes agree on what one event means. Keys also expire in
///   Redis time (`PEXPIRE` window, `PX` hold), so idle subjects cost nothing.
/// - **Keys** are `<prefix>{<subject>}:<detector>:w` (the window) and
///   `<prefix>{<subject>}:<detector>:open`: both keys of a script share a Redis Cluster
///   hash slot. A subject holding `{` or `}` is replaced by its SHA-256. The prefix
///   defaults to `upcoach:threat:`; it must not hold braces.
/// - **Errors** come back as [`StateError::Backend`]; the detector logs and counts
///   them and goes on (an outage costs detection, never a sign-in).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use upcoach_auth::threat::{RedisDetectorState, ThreatDetector};
/// use upcoach_core::config::ServiceUrl;
/// use upcoach_core::event::MemoryEventLog;
/// use upcoach_core::redis::{RedisConnection, RedisOptions};
///
/// let url = ServiceUrl::parse("redis://127.0.0.1:6379", &["redis"])?;
/// let redis = RedisConnection::connect(&url, RedisOptions::default()).await?;
/// let state = RedisDetectorState::new(redis).with_prefix("myapp:threat:");
/// let detector = ThreatDetector::builder(Arc::new(MemoryEventLog::default()))
///     .state(Arc::new(state))
///     .build();
/// # let _ = detector; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisDetectorState {
    conn: RedisConnection,
    prefix: String,
}

impl fmt::Debug for RedisDetectorState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisDetectorState")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisDetectorState {
    /// The prefix of every key unless [`with_prefix`](Self::with_prefix) says otherwise.
    pub const DEFAULT_PREFIX: &'static str = "upcoach:threat:";

    /// A state using `conn`, with keys under [`DEFAULT_PREFIX`](Self::DEFAULT_PREFIX).
    pub fn new(conn: RedisConnection) -> Self {
        Self {
            conn,
            prefix: Self::DEFAULT_PREFIX.to_owned(),
        }
    }

    /// The same state with keys under `prefix` (put in front of each key as is, so end
    /// it with a separator such as `:`; no braces).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The prefix of every key.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The window key and the open-alert key of (`detector`, `subject`).
    pub fn keys(&self, detector: &str, subject: &str) -> [String; 2] {
        let tag = if subject.contains(['{', '}']) {
            let digest = sha2::Sha256::digest(subject.as_bytes());
            let mut hex = String::with_capacity(64);
            for b in digest {
                hex.push_str(&format!("{b:02x}"));
            }
            format!("sha256:{hex}")
        } else {
            subject.to_owned()
        };
        let base = format!("{}{{{tag}}}:{detector}", self.prefix);
        [format!("{base}:w"), format!("{base}:open")]
    }
}

#[async_trait]
impl DetectorState for RedisDetectorState {
    async fn observe(&self, o: &Observation<'_>) -> Result<Tally, StateError> {
        let [window_key, open_key] = self.keys(o.detector, o.subject);
        let reply: (u64, u8) = ::redis::cmd("EVAL")
            .arg(OBSERVE)
            .arg(2)
            .arg(window_key)
            .arg(open_key)
            .arg(o.at_millis())
            .arg(millis(o.window).max(1))
            .arg(o.member)
            .arg(o.threshold)
            .arg(millis(o.hold))
            .arg(MAX_WINDOW_MEMBERS)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| StateError::Backend {
                backend: BACKEND,
                source: Box::new(e),
            })?;
        Ok(Tally {
            count: reply.0,
            opened: reply.1 == 1,
        })
    }
}
