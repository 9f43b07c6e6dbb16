//! The budget of WebSocket connections that have not authenticated yet.
//!
//! A WebSocket opened without a token (it sends `{"type":"auth"}` first) proves nothing
//! about its client until that message comes, so it does not take one of the hub's
//! shared places ([`HubConfig::max_connections`](crate::HubConfig::max_connections)):
//! it holds a [`PendingPermit`] of a small budget of its own, per client address and
//! in all, and takes a shared place only when it authenticates. A few silent sockets
//! from one address then exhaust that address's budget, not everyone's connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::hub::{Inner, Refusal};

/// The address key shared by requests that carry no
/// [`ClientAddr`](upcoach_core::http::ClientAddr).
const UNKNOWN_ADDRESS: &str = "unknown";

/// Connections waiting to authenticate, counted per client address and in all.
#[derive(Debug, Default)]
pub(crate) struct PendingAuth {
    /// Pending connections per address key; an address leaves the map when its count
    /// drops to zero, so the map holds at most `max_pending_auth` entries.
    by_address: Mutex<HashMap<Arc<str>, usize>>,
    /// The sum of `by_address`, readable without the lock.
    total: AtomicUsize,
}

impl PendingAuth {
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, usize>> {
        self.by_address.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pending connections in all.
    pub(crate) fn count(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Pending connections from `ip` (`None`: requests without an address).
    #[cfg(test)]
    fn count_for(&self, ip: Option<IpAddr>) -> usize {
        self.lock().get(&*address_key(ip)).copied().unwrap_or(0)
    }
}

/// The budget key of a client address: [`ip_subject`](upcoach_core::limit::ip_subject)
/// (IPv6 grouped by /64, IPv4-mapped IPv6 as IPv4), or one shared key when the host
/// recorded no address.
fn address_key(ip: Option<IpAddr>) -> Arc<str> {
    match ip {
        Some(ip) => Arc::from(upcoach_core::limit::ip_subject(ip)),
        None => Arc::from(UNKNOWN_ADDRESS),
    }
}

/// A place in the pending-auth budget; given back on drop.
#[derive(Debug)]
pub(crate) struct PendingPermit {
    hub: Arc<Inner>,
    address: Arc<str>,
}

impl PendingPermit {
    pub(crate) fn hub(&self) -> &Arc<Inner> {
        &self.hub
    }
}

impl Drop for PendingPermit {
    fn drop(&mut self) {
        let pending = &self.hub.pending;
        let mut by_address = pending.lock();
        if let Some(count) = by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                by_address.remove(&self.address);
            }
        }
        let was = pending.total.fetch_sub(1, Ordering::AcqRel);
        drop(by_address);
        if was == 1 {
            self.hub.all_closed.notify_waiters();
        }
    }
}

impl Inner {
    /// Admits one more connection that has not authenticated, from `ip`, or says why
    /// not: the hub is shutting down, or the address's or the total pending budget is
    /// spent ([`Refusal::TooManyPending`]).
    pub(crate) fn admit_pending(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
    ) -> Result<PendingPermit, Refusal> {
        if *self.shutdown.borrow() {
            return Err(Refusal::ShuttingDown);
        }
        let address = address_key(ip);
        let pending = &self.pending;
        let mut by_address = pending.lock();
        let from_address = by_address.get(&address).copied().unwrap_or(0);
        if pending.total.load(Ordering::Acquire) >= self.config.max_pending_auth
            || from_address >= self.config.max_pending_auth_per_address
        {
            drop(by_address);
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            self.counters
                .refused_pending
                .fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::TooManyPending);
        }
        by_address.insert(address.clone(), from_address + 1);
        pending.total.fetch_add(1, Ordering::AcqRel);
        drop(by_address);
        Ok(PendingPermit {
            hub: self.clone(),
            address,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use upcoach_core::{Principal, TokenError, TokenVerifier};

    use super::*;
    use crate::{Hub, HubConfig, MemoryBroadcaster};

    #[derive(Debug)]
    struct NoTokens;

    #[async_trait::async_trait]
    impl TokenVerifier for NoTokens {
        async fn verify(&self, _: &str) -> Result<Principal, TokenError> {
            Err(TokenError::Missing)
        }
    }

    fn hub(per_address: usize, total: usize) -> Hub {
        Hub::builder(Arc::new(MemoryBroadcaster::default()), Arc::new(NoTokens))
            .config(HubConfig {
                max_pending_auth: total,
                max_pending_auth_per_address: per_address,
                ..HubConfig::default()
            })
            .build()
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn each_address_has_its_own_budget_and_ipv6_counts_by_64() {
        let hub = hub(2, 100);
        let inner = &hub.inner;
        let a = [
            inner.admit_pending(ip("2001:db8:1:2::1")).unwrap(),
            inner.admit_pending(ip("2001:db8:1:2:ffff::9")).unwrap(),
        ];
        assert_eq!(
            inner.admit_pending(ip("2001:db8:1:2::3")).unwrap_err(),
            Refusal::TooManyPending,
            "the same /64"
        );
        let _other_64 = inner.admit_pending(ip("2001:db8:1:3::1")).unwrap();
        let _v4 = inner.admit_pending(ip("192.0.2.7")).unwrap();
        let _mapped = inner.admit_pending(ip("::ffff:192.0.2.7")).unwrap();
        assert_eq!(
            inner.admit_pending(ip("192.0.2.7")).unwrap_err(),
            Refusal::TooManyPending,
            "IPv4-mapped IPv6 is the IPv4 address"
        );
        let _unknown = [
            inner.admit_pending(None).unwrap(),
            inner.admit_pending(None).unwrap(),
        ];
        assert!(inner.admit_pending(None).is_err(), "no address: one budget");
        assert_eq!(inner.pending.count(), 7);
        drop(a);
        assert_eq!(inner.pending.count_for(ip("2001:db8:1:2::1")), 0);
        assert_eq!(inner.pending.count(), 5);
        let _again = inner.admit_pending(ip("2001:db8:1:2::3")).unwrap();
        assert_eq!(hub.stats().refused_pending, 3);
    }

    #[test]
    fn the_total_budget_bounds_every_address_and_the_map() {
        let hub = hub(1, 3);
        let inner = &hub.inner;
        let held: Vec<_> = (1..=3)
            .map(|i| inner.admit_pending(ip(&format!("198.51.100.{i}"))).unwrap())
            .collect();
        assert_eq!(
            inner.admit_pending(ip("198.51.100.4")).unwrap_err(),
            Refusal::TooManyPending
        );
        assert_eq!(inner.pending.lock().len(), 3);
        drop(held);
        assert!(inner.pending.lock().is_empty(), "emptied addresses leave");
        assert_eq!(inner.pending.count(), 0);
    }

    #[tokio::test]
    async fn shutdown_refuses_and_waits_for_pending_connections() {
        let hub = hub(4, 4);
        let permit = hub.inner.admit_pending(ip("192.0.2.1")).unwrap();
        let stopping = tokio::spawn({
            let hub = hub.clone();
            async move { hub.shutdown(std::time::Duration::from_secs(5)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            hub.inner.admit_pending(ip("192.0.2.2")).unwrap_err(),
            Refusal::ShuttingDown
        );
        assert!(
            !stopping.is_finished(),
            "a pending connection is still open"
        );
        drop(permit);
        assert_eq!(stopping.await.unwrap(), 0);
    }
}
