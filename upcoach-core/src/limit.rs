//! Rate limits: the [`RateLimiter`] seam, GCRA in memory ([`MemoryLimiter`], on
//! `governor`) and in Redis ([`RedisLimiter`], feature `redis`: one atomic script per
//! check on Redis server time, so several processes on one Redis share one budget).
//!
//! A check names a **subject** (who is limited: `ip:203.0.113.7`, `ip:2001:db8:1:2::/64`,
//! `user:<uuid>`, `provider:google`, `route:POST /auth/{provider}/refresh`) and a
//! **rule** (which budget: `auth.refresh`), and gives the rule's [`Quota`]. Each
//! (rule, subject) pair has its own budget. [`RateLimiter::block`] shuts a subject out
//! of every rule for a while (what threat detection does to an offender).
//!
//! ```
//! use std::time::Duration;
//! use upcoach_core::limit::{MemoryLimiter, Quota, RateLimiter};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let limiter = MemoryLimiter::new();
//! let quota = Quota::new(2, Duration::from_secs(60)).unwrap();
//! assert!(limiter.check("auth.refresh", "ip:203.0.113.7", quota).await.unwrap().allowed);
//! assert!(limiter.check("auth.refresh", "ip:203.0.113.7", quota).await.unwrap().allowed);
//! let third = limiter.check("auth.refresh", "ip:203.0.113.7", quota).await.unwrap();
//! assert!(!third.allowed && third.retry_after > Duration::ZERO);
//! // Another subject has its own budget.
//! assert!(limiter.check("auth.refresh", "ip:203.0.113.8", quota).await.unwrap().allowed);
//! # });
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;

mod memory;
#[cfg(feature = "redis")]
mod redis;

pub use memory::{MemoryLimiter, MemoryLimiterStats};
#[cfg(feature = "redis")]
pub use redis::RedisLimiter;

/// The longest subject or rule name a limiter accepts, in bytes.
pub const MAX_NAME_LEN: usize = 200;

/// A budget: `limit` requests per `window`, all of which may come at once (a full
/// bucket), refilled evenly (one every `window / limit`). This is GCRA's emission
/// interval and burst tolerance, and it is what `RateLimit-Policy: q=limit; w=window`
/// states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    limit: u32,
    window: Duration,
}

impl Quota {
    /// `limit` requests per `window`; `None` when either is zero or the window is
    /// shorter than a millisecond or longer than a day.
    pub fn new(limit: u32, window: Duration) -> Option<Self> {
        (limit > 0
            && window >= Duration::from_millis(1)
            && window <= Duration::from_secs(86_400)
            && window / limit > Duration::ZERO)
            .then_some(Self { limit, window })
    }

    /// How many requests the window holds.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The time one request's place takes to come back: `window / limit`.
    pub fn emission_interval(&self) -> Duration {
        self.window / self.limit
    }

    /// This quota with its limit divided by `factor` (at least 1 request per window):
    /// how a rule is tightened.
    pub fn tightened(self, factor: u32) -> Self {
        Self {
            limit: (self.limit / factor.max(1)).max(1),
            window: self.window,
        }
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}s", self.limit, self.window.as_secs_f64())
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may go ahead (and was counted).
    pub allowed: bool,
    /// The quota's limit (`RateLimit-Policy`'s `q`).
    pub limit: u32,
    /// Requests that could still go ahead right now (`RateLimit`'s `r`).
    pub remaining: u32,
    /// When the whole budget is back if nothing more comes (`RateLimit`'s `t`).
    pub reset_after: Duration,
    /// When a refused request may be tried again (`Retry-After`); zero when allowed.
    pub retry_after: Duration,
}

/// Why a limiter could not decide.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// The backing store (Redis) did not answer; the rule's outage policy decides.
    #[error("the rate limiter's store is unavailable: {0}")]
    Unavailable(String),
    /// A rule or subject name is empty, too long or holds `{`, `}` or control
    /// characters.
    #[error("invalid rate-limit name {0:?}")]
    InvalidName(String),
}

impl LimitError {
    /// A stable code for logs and error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            LimitError::Unavailable(_) => "rate_limiter_unavailable",
            LimitError::InvalidName(_) => "invalid_rate_limit_name",
        }
    }
}

/// Checks whether `subject` may make one more request under `rule`'s quota.
///
/// Implementations are GCRA: a subject that keeps to the quota is never refused, and
/// one that bursts gets `limit` requests and then one every `window / limit`.
///
/// `check` returns a [`LimitFuture`]: an in-process limiter hands back the decision
/// made ([`LimitFuture::ready`], awaiting it allocates nothing), a remote one the work
/// still to do ([`LimitFuture::pending`]). `block` is an `async_trait` method.
///
/// ```
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use upcoach_core::limit::{Decision, LimitError, LimitFuture, Quota, RateLimiter};
///
/// /// Lets everything through (a stand-in for a test).
/// #[derive(Debug)]
/// struct Open;
///
/// #[async_trait]
/// impl RateLimiter for Open {
///     fn check<'a>(&'a self, _: &'a str, _: &'a str, quota: Quota) -> LimitFuture<'a> {
///         LimitFuture::ready(Ok(Decision {
///             allowed: true,
///             limit: quota.limit(),
///             remaining: quota.limit(),
///             reset_after: Duration::ZERO,
///             retry_after: Duration::ZERO,
///         }))
///     }
///
///     async fn block(&self, _: &str, _: Duration) -> Result<(), LimitError> {
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait RateLimiter: fmt::Debug + Send + Sync + 'static {
    /// Counts one request of `subject` against `rule` (when allowed) and says whether it
    /// may go ahead. A blocked subject is refused until its block ends.
    fn check<'a>(&'a self, rule: &'a str, subject: &'a str, quota: Quota) -> LimitFuture<'a>;

    /// The decision right away, when this limiter can make it without waiting on I/O:
    /// an in-process limiter does (same semantics as [`check`](Self::check)); a remote
    /// store answers `None` (the default) and the caller awaits
    /// [`check`](Self::check). Callers on a hot path try this first.
    fn check_now(
        &self,
        rule: &str,
        subject: &str,
        quota: Quota,
    ) -> Option<Result<Decision, LimitError>> {
        let _ = (rule, subject, quota);
        None
    }

    /// Refuses every request of `subject`, under every rule, for `duration`. A longer
    /// block replaces a shorter one; a shorter one does not cut a longer one.
    async fn block(&self, subject: &str, duration: Duration) -> Result<(), LimitError>;
}

/// What [`RateLimiter::check`] returns: a decision already made, or a future that
/// makes it. Awaiting a made decision allocates nothing.
#[must_use = "a check decides nothing until it is awaited"]
pub struct LimitFuture<'a>(Check<'a>);

/// The two kinds of [`LimitFuture`].
enum Check<'a> {
    /// Taken when polled.
    Made(Option<Result<Decision, LimitError>>),
    Pending(Pin<Box<dyn Future<Output = Result<Decision, LimitError>> + Send + 'a>>),
}

impl<'a> LimitFuture<'a> {
    /// A decision already made (an in-process limiter).
    pub fn ready(decided: Result<Decision, LimitError>) -> Self {
        Self(Check::Made(Some(decided)))
    }

    /// A decision still to be made by `future` (a remote store), boxed.
    pub fn pending(future: impl Future<Output = Result<Decision, LimitError>> + Send + 'a) -> Self {
        Self(Check::Pending(Box::pin(future)))
    }

    /// The decision if it is made already, or else this future back.
    pub fn into_ready(self) -> Result<Result<Decision, LimitError>, Self> {
        match self.0 {
            Check::Made(Some(decided)) => Ok(decided),
            check => Err(Self(check)),
        }
    }
}

impl Future for LimitFuture<'_> {
    type Output = Result<Decision, LimitError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            Check::Made(decided) => Poll::Ready(decided.take().unwrap_or_else(|| {
                Err(LimitError::Unavailable(
                    "a rate-limit check was polled after it finished".into(),
                ))
            })),
            Check::Pending(future) => future.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for LimitFuture<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Check::Made(decided) => f.debug_tuple("LimitFuture::Made").field(decided).finish(),
            Check::Pending(_) => f.write_str("LimitFuture::Pending"),
        }
    }
}

/// Checks a rule or subject name: 1 to [`MAX_NAME_LEN`] bytes, no braces (they are
/// Redis Cluster hash tags) and no control characters.
pub fn validate_name(name: &str) -> Result<(), LimitError> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name.chars().any(|c| c == '{' || c == '}' || c.is_control())
    {
        return Err(LimitError::InvalidName(
            name.chars().take(40).collect::<String>(),
        ));
    }
    Ok(())
}

/// The subject that limits a client address: `ip:203.0.113.7` for IPv4 (and IPv4
/// mapped into IPv6), `ip:2001:db8:1:2::/64` for IPv6, whose /64 is what one client
/// usually holds.
///
/// ```
/// use upcoach_core::limit::ip_subject;
///
/// assert_eq!(ip_subject("203.0.113.7".parse().unwrap()), "ip:203.0.113.7");
/// assert_eq!(ip_subject("2001:db8:1:2:aaaa::1".parse().unwrap()), "ip:2001:db8:1:2::/64");
/// assert_eq!(ip_subject("::ffff:203.0.113.7".parse().unwrap()), "ip:203.0.113.7");
/// ```
pub fn ip_subject(ip: std::net::IpAddr) -> String {
    use std::net::{IpAddr, Ipv6Addr};
    match ip {
        IpAddr::V4(v4) => format!("ip:{v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("ip:{v4}"),
            None => {
                let s = v6.segments();
                let net = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("ip:{net}/64")
            }
        },
    }
}
