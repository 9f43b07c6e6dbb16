//! The broadcaster conformance suite against the in-memory and the Redis broadcaster.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use upcoach_core::ManualClock;
use upcoach_realtime::testing::{MakeBroadcaster, broadcaster_conformance};
use upcoach_realtime::{
    Broadcaster, HistoryLimits, MemoryBroadcaster, RedisBroadcaster, RedisBroadcasterOptions,
};
use upcoach_testing::RedisPrefix;

struct Memory;

#[async_trait]
impl MakeBroadcaster for Memory {
    async fn make(&self, history: HistoryLimits, clock: Arc<ManualClock>) -> Arc<dyn Broadcaster> {
        Arc::new(MemoryBroadcaster::new(history, clock))
    }
}

#[tokio::test]
async fn memory_broadcaster_conforms() {
    broadcaster_conformance(&Memory).await;
}

/// Each broadcaster gets a prefix of its own; the prefixes (and their keys) go when the
/// test ends.
struct Redis {
    prefixes: Mutex<Vec<RedisPrefix>>,
    /// On the Redis Cluster of `REDIS_CLUSTER_URL` rather than `REDIS_URL`.
    cluster: bool,
}

#[async_trait]
impl MakeBroadcaster for Redis {
    async fn make(&self, history: HistoryLimits, clock: Arc<ManualClock>) -> Arc<dyn Broadcaster> {
        let prefix = if self.cluster {
            RedisPrefix::on_cluster().expect("REDIS_CLUSTER_URL checked by the test")
        } else {
            RedisPrefix::create().expect("REDIS_URL checked by the test")
        };
        let options = RedisBroadcasterOptions {
            prefix: prefix.key("rt"),
            history,
            clock,
            ..RedisBroadcasterOptions::default()
        };
        let broadcaster = RedisBroadcaster::connect(prefix.url(), options)
            .await
            .unwrap();
        self.prefixes.lock().unwrap().push(prefix);
        Arc::new(broadcaster)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broadcaster_conforms() {
    if RedisPrefix::create().is_none() {
        return;
    }
    broadcaster_conformance(&Redis {
        prefixes: Mutex::new(Vec::new()),
        cluster: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broadcaster_conforms_on_a_cluster() {
    if RedisPrefix::on_cluster().is_none() {
        return;
    }
    broadcaster_conformance(&Redis {
        prefixes: Mutex::new(Vec::new()),
        cluster: true,
    })
    .await;
}
