//! GCRA in Redis: [`RedisLimiter`].

use ::redis::Script;

use super::*;
use crate::redis::RedisConnection;

/// One check: GCRA on a stored theoretical arrival time (TAT), on Redis server time.
///
/// KEYS[1]: the (rule, subject) TAT, in microseconds since the epoch.
/// KEYS[2]: the subject's block: when it ends, in microseconds since the epoch.
/// ARGV[1]: emission interval in microseconds (at least 1); ARGV[2]: limit.
/// Returns {allowed, remaining, reset_after_us, retry_after_us}.
///
/// Three commands (TIME, MGET, SET) keep it cheap: each `redis.call` costs about a
/// microsecond of Redis's time. Times are passed to SET as Lua numbers (Redis writes
/// them exactly, `%.17g`, and `tonumber` reads any spelling back); expiries as
/// `tostring` of whole milliseconds, exact below 10^14.
const CHECK: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local state = redis.call('MGET', KEYS[1], KEYS[2])
local blocked_until = tonumber(state[2] or '')
if blocked_until and blocked_until > now then
  return {0, 0, blocked_until - now, blocked_until - now}
end
local interval = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local tau = interval * (limit - 1)
local tat = tonumber(state[1] or '') or now
if tat < now then
  tat = now
end
local allow_at = tat - tau
if now < allow_at then
  return {0, 0, tat - now, allow_at - now}
end
local next_tat = tat + interval
redis.call('SET', KEYS[1], next_tat, 'PX', tostring(math.ceil((next_tat - now) / 1000)))
local remaining = math.floor((now + tau + interval - next_tat) / interval)
return {1, remaining, next_tat - now, 0}
";

/// One block: KEYS[1] the subject's block, ARGV[1] its length in milliseconds. Stores
/// when it ends (server time, microseconds) and expires then. Only lengthens: a block
/// ending later is kept.
const BLOCK: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local ms = tonumber(ARGV[1])
local ends = now + ms * 1000
local current = tonumber(redis.call('GET', KEYS[1]) or '')
if current and current >= ends then
  return 0
end
redis.call('SET', KEYS[1], ends, 'PX', ARGV[1])
return 1
";

/// The longest block Redis is asked for (100 years); longer ones are cut to it.
const MAX_BLOCK_MS: u128 = 100 * 365 * 86_400 * 1000;

/// GCRA in Redis (feature `redis`): one atomic script per check (`EVALSHA`, loaded on
/// first use), on Redis server time, so every process on one Redis shares one budget
/// per (rule, subject) and clock skew between hosts does not matter.
///
/// - **Keys**: `<prefix>:{<subject>}:r:<rule>` holds the theoretical arrival time and
///   expires when the bucket is full again, so idle subjects cost nothing;
///   `<prefix>:{<subject>}:block` holds when the subject's block ends (microseconds of
///   server time) and expires then. Both share the subject as a hash tag, so the script
///   runs on Redis Cluster. The prefix should not contain `{` or `}`.
/// - **Precision**: microseconds; an emission interval below 1 µs (over a million
///   requests a second) is taken as 1 µs.
/// - **Outages**: every call gives up after [`timeout`](Self::with_timeout) (1 s by
///   default); a Redis error or timeout is [`LimitError::Unavailable`], for the rule's
///   outage policy to decide.
/// - **Quotas**: the stored arrival time is per (rule, subject), whatever the quota: a
///   rule whose quota changes carries its subjects' use over to the new quota.
///
/// ```no_run
/// use std::time::Duration;
/// use upcoach_core::config::ServiceUrl;
/// use upcoach_core::limit::{Quota, RateLimiter, RedisLimiter};
/// use upcoach_core::redis::{RedisConnection, RedisOptions};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let url = ServiceUrl::parse("redis://127.0.0.1:6379", &["redis"])?;
/// let redis = RedisConnection::connect(&url, RedisOptions::default()).await?;
/// let limiter = RedisLimiter::new(redis, "myapp:limit").with_timeout(Duration::from_millis(250));
/// let quota = Quota::new(10, Duration::from_secs(60)).unwrap();
/// let decision = limiter.check("auth.login", "ip:203.0.113.7", quota).await?;
/// # let _ = decision; Ok(()) }
/// ```
pub struct RedisLimiter {
    conn: RedisConnection,
    prefix: String,
    timeout: Duration,
    check: Script,
    block: Script,
}

impl RedisLimiter {
    /// How long a call waits for Redis unless told otherwise.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

    /// A limiter keeping its state under `prefix` (e.g. `myapp:limit`) on `conn`.
    pub fn new(conn: RedisConnection, prefix: impl Into<String>) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            timeout: Self::DEFAULT_TIMEOUT,
            check: Script::new(CHECK),
            block: Script::new(BLOCK),
        }
    }

    /// Gives up on Redis after `timeout` (at least 1 ms) per call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The script each check runs (`KEYS`: [`rule_key`](Self::rule_key),
    /// [`block_key`](Self::block_key); `ARGV`: emission interval in microseconds, limit),
    /// to preload it (`SCRIPT LOAD`) or to measure it alone.
    pub fn check_script(&self) -> &Script {
        &self.check
    }

    /// The Redis key holding the arrival time of (`rule`, `subject`).
    pub fn rule_key(&self, rule: &str, subject: &str) -> String {
        format!("{}:{{{subject}}}:r:{rule}", self.prefix)
    }

    /// The Redis key holding `subject`'s block.
    pub fn block_key(&self, subject: &str) -> String {
        format!("{}:{{{subject}}}:block", self.prefix)
    }

    /// Runs `invocation` with the timeout; failures are [`LimitError::Unavailable`].
    async fn run<T: ::redis::FromRedisValue>(
        &self,
        invocation: &::redis::ScriptInvocation<'_>,
    ) -> Result<T, LimitError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(LimitError::Unavailable(format!("Redis: {error}"))),
            Err(_) => Err(LimitError::Unavailable(format!(
                "Redis did not answer within {:?}",
                self.timeout
            ))),
        }
    }
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("conn", &self.conn)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[async_trait]
impl RateLimiter for RedisLimiter {
    fn check<'a>(&'a self, rule: &'a str, subject: &'a str, quota: Quota) -> LimitFuture<'a> {
        LimitFuture::pending(self.check_in_redis(rule, subject, quota))
    }

    async fn block(&self, subject: &str, duration: Duration) -> Result<(), LimitError> {
        validate_name(subject)?;
        if duration.is_zero() {
            return Ok(());
        }
        // Whole milliseconds, rounded up, so a block is never shorter than asked.
        let ms = duration.as_nanos().div_ceil(1_000_000).min(MAX_BLOCK_MS) as u64;
        let mut invocation = self.block.prepare_invoke();
        invocation.key(self.block_key(subject)).arg(ms);
        let _: i64 = self.run(&invocation).await?;
        Ok(())
    }
}

impl RedisLimiter {
    /// One check: the script, and its reply read.
    async fn check_in_redis(
        &self,
        rule: &str,
        subject: &str,
        quota: Quota,
    ) -> Result<Decision, LimitError> {
        validate_name(rule)?;
        validate_name(subject)?;
        let interval = u64::try_from(quota.emission_interval().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut invocation = self.check.prepare_invoke();
        invocation
            .key(self.rule_key(rule, subject))
            .key(self.block_key(subject))
            .arg(interval)
            .arg(quota.limit());
        let reply: Vec<i64> = self.run(&invocation).await?;
        let &[allowed, remaining, reset_after, retry_after] = reply.as_slice() else {
            return Err(LimitError::Unavailable(format!(
                "unexpected reply from the rate-limit script: {reply:?}"
            )));
        };
        let micros = |us: i64| Duration::from_micros(us.max(0).unsigned_abs());
        Ok(Decision {
            allowed: allowed == 1,
            limit: quota.limit(),
            remaining: u32::try_from(remaining.max(0))
                .unwrap_or(u32::MAX)
                .min(quota.limit()),
            reset_after: micros(reset_after),
            retry_after: micros(retry_after),
        })
    }
}
