//! GCRA in memory, on `governor` (placeholder until the backend lands).
use super::*;

/// GCRA in memory.
#[derive(Debug, Default)]
pub struct MemoryLimiter {}

impl MemoryLimiter {
    /// A limiter.
    pub fn new() -> Self {
        Self {}
    }
}

#[async_trait]
impl RateLimiter for MemoryLimiter {
    async fn check(&self, _rule: &str, _subject: &str, quota: Quota) -> Result<Decision, LimitError> {
        Ok(Decision { allowed: true, limit: quota.limit(), remaining: quota.limit(), reset_after: Duration::ZERO, retry_after: Duration::ZERO })
    }
    async fn block(&self, _subject: &str, _duration: Duration) -> Result<(), LimitError> {
        Ok(())
    }
}
