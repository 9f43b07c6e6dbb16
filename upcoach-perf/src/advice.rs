//! Performance recommendations from what was measured, as the JSON of
//! `POST /api/performance/optimize`'s `recommendations` array.
//!
//! - [`slow_routes`]: the slowest routes of [`RequestMetrics`] (`"kind": "slow_route"`);
//! - [`cache_hit_rate`]: a poor cache hit rate (`"kind": "cache_hit_rate"`), given as
//!   plain numbers ([`CacheReads`]) so that this crate needs no cache crate;
//! - with the `postgres` feature, [`slow_queries`] (`"kind": "slow_query"`, with the
//!   nodes of each statement's plan) and [`recommendations`], all three in that order.
//!
//! Nothing here changes schema, data or settings: it only reads.
//!
//! ```
//! use std::time::Duration;
//! use upcoach_perf::advice::{self, CacheReads};
//! use upcoach_perf::{RequestMetrics, RouteTable};
//!
//! let metrics = RequestMetrics::new(RouteTable::new(["/api/report"])?);
//! for _ in 0..10 {
//!     metrics.record_request(&http::Method::GET, "/api/report", Some(200), Duration::from_millis(600));
//! }
//! let mut recommendations = advice::slow_routes(&metrics);
//! recommendations.extend(advice::cache_hit_rate(CacheReads { reads: 1_000, hit_rate: 0.5 }));
//! assert_eq!(recommendations[0]["kind"], "slow_route");
//! assert_eq!(recommendations[0]["route"], "/api/report");
//! assert_eq!(recommendations[1]["kind"], "cache_hit_rate");
//! # Ok::<(), upcoach_perf::InvalidTemplate>(())
//! ```

use serde_json::Value;

use crate::{MIN_REQUESTS_FOR_ERROR_RATE, RequestMetrics, UNMATCHED};

/// How many slow-query digests [`slow_queries`] looks at, the most total time first.
pub const MAX_SLOW_QUERIES: usize = 5;

/// How many routes [`slow_routes`] names at most.
pub const MAX_SLOW_ROUTES: usize = 3;

/// Requests a route needs since start before [`slow_routes`] considers it.
pub const MIN_ROUTE_REQUESTS: u64 = 10;

/// A route p95 (milliseconds) from which [`slow_routes`] advises caching it.
pub const SLOW_ROUTE_P95_MS: f64 = 500.0;

/// A hit rate under which [`cache_hit_rate`] speaks up.
pub const POOR_HIT_RATE: f64 = 0.8;

/// Reads of a cache, as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheReads {
    /// Every read: hits of every tier and misses.
    pub reads: u64,
    /// The share of reads that hit, 0 to 1 (as the cache reports it).
    pub hit_rate: f64,
}

/// Up to [`MAX_SLOW_ROUTES`] routes with at least [`MIN_ROUTE_REQUESTS`] requests (never
/// `unmatched`), the highest p95 first, each `{"kind": "slow_route", "method", "route",
/// "count", "p95_ms", "advice"}`; the advice says to cache the response from a p95 of
/// [`SLOW_ROUTE_P95_MS`], and otherwise that the route is within budget.
pub fn slow_routes(requests: &RequestMetrics) -> Vec<Value> {
    let mut routes = requests.snapshot();
    routes.retain(|r| r.count >= MIN_ROUTE_REQUESTS && r.route != UNMATCHED);
    routes.sort_by(|a, b| b.latency.p95_ms.total_cmp(&a.latency.p95_ms));
    routes
        .into_iter()
        .take(MAX_SLOW_ROUTES)
        .map(|route| {
            let slow = route.latency.p95_ms >= SLOW_ROUTE_P95_MS;
            serde_json::json!({
                "kind": "slow_route",
                "method": route.method,
                "route": route.route,
                "count": route.count,
                "p95_ms": route.latency.p95_ms,
                "advice": if slow {
                    format!("{} {} has p95 {} ms: cache its response or look at its queries", route.method, route.route, route.latency.p95_ms)
                } else {
                    format!("{} {} is among the slowest routes (p95 {} ms), within budget", route.method, route.route, route.latency.p95_ms)
                },
            })
        })
        .collect()
}

/// `{"kind": "cache_hit_rate", "hit_rate", "reads", "advice"}` when the cache served at
/// least [`MIN_REQUESTS_FOR_ERROR_RATE`] reads and hit under [`POOR_HIT_RATE`] of them;
/// `None` otherwise.
pub fn cache_hit_rate(cache: CacheReads) -> Option<Value> {
    let CacheReads { reads, hit_rate } = cache;
    (reads >= MIN_REQUESTS_FOR_ERROR_RATE && hit_rate < POOR_HIT_RATE).then(|| {
        serde_json::json!({
            "kind": "cache_hit_rate",
            "hit_rate": hit_rate,
            "reads": reads,
            "advice": format!(
                "the cache answers {:.0} % of {reads} reads (under 80 %): longer TTLs or fewer tag invalidations would help",
                hit_rate * 100.0
            ),
        })
    })
}

#[cfg(feature = "postgres")]
pub use postgres::{recommendations, slow_queries};

#[cfg(feature = "postgres")]
mod postgres {
    use serde_json::Value;
    use upcoach_core::postgres::MeteredPool;

    use super::{CacheReads, MAX_SLOW_QUERIES};
    use crate::RequestMetrics;
    use crate::slow::SlowQueryLog;
    use crate::slow::explain::{explain, plan_nodes};

    /// The first [`MAX_SLOW_QUERIES`] digests of `log`, each `{"kind": "slow_query",
    /// "digest", "count", "p95_ms", "plan_nodes", "advice"}`. With a `pool`, the
    /// statement kept for the digest is [explained](explain) and `plan_nodes` lists the
    /// plan's nodes (`null` without a plan); a plan that scans whole tables adds advice
    /// about an index.
    pub async fn slow_queries(log: &SlowQueryLog, pool: Option<&MeteredPool>) -> Vec<Value> {
        let mut out = Vec::new();
        for digest in log.digests().into_iter().take(MAX_SLOW_QUERIES) {
            let mut reason = format!(
                "{} ran slower than {} ms {} times (p95 {} ms, max {} ms)",
                digest.digest,
                log.threshold().as_millis(),
                digest.count,
                digest.p95_ms,
                digest.max_ms
            );
            let mut plan = None;
            if let (Some(pool), Some(sql)) = (pool, log.sample(&digest.digest))
                && let Ok(p) = explain(pool, &sql).await
            {
                let nodes = plan_nodes(&p);
                if nodes.iter().any(|n| n.starts_with("Seq Scan")) {
                    reason.push_str(
                        "; the plan scans whole tables: an index on the filtered columns may help",
                    );
                }
                plan = Some(nodes);
            }
            out.push(serde_json::json!({
                "kind": "slow_query",
                "digest": digest.digest,
                "count": digest.count,
                "p95_ms": digest.p95_ms,
                "plan_nodes": plan,
                "advice": reason,
            }));
        }
        out
    }

    /// The `recommendations` array of `POST /api/performance/optimize`:
    /// [`slow_queries`] of `log` (explained on `pool`), then
    /// [`slow_routes`](super::slow_routes) of `requests`, then
    /// [`cache_hit_rate`](super::cache_hit_rate) of `cache` if given.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use upcoach_core::postgres::MeteredPool;
    /// use upcoach_perf::advice::{CacheReads, recommendations};
    /// use upcoach_perf::slow::SlowQueryLog;
    /// use upcoach_perf::{RequestMetrics, RouteTable};
    ///
    /// # async fn run(pool: MeteredPool) -> Result<(), upcoach_perf::InvalidTemplate> {
    /// let log = SlowQueryLog::new(Duration::from_millis(200), 100);
    /// let requests = RequestMetrics::new(RouteTable::new(["/health"])?);
    /// let cache = CacheReads { reads: 5_000, hit_rate: 0.93 };
    /// let body = serde_json::json!({
    ///     "recommendations": recommendations(&log, Some(&pool), &requests, Some(cache)).await,
    /// });
    /// # let _ = body;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn recommendations(
        log: &SlowQueryLog,
        pool: Option<&MeteredPool>,
        requests: &RequestMetrics,
        cache: Option<CacheReads>,
    ) -> Vec<Value> {
        let mut out = slow_queries(log, pool).await;
        out.extend(super::slow_routes(requests));
        out.extend(cache.and_then(super::cache_hit_rate));
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::RouteTable;

    #[test]
    fn slow_routes_are_the_three_slowest_with_enough_requests() {
        let metrics =
            RequestMetrics::new(RouteTable::new(["/a", "/b", "/c", "/d", "/rare"]).unwrap());
        let record = |path: &str, n: usize, ms: u64| {
            for _ in 0..n {
                metrics.record_request(
                    &http::Method::GET,
                    path,
                    Some(200),
                    Duration::from_millis(ms),
                );
            }
        };
        record("/a", 10, 20);
        record("/b", 10, 700);
        record("/c", 10, 100);
        record("/d", 10, 5);
        record("/rare", 9, 2_000);
        record("/nowhere", 50, 3_000);
        let out = slow_routes(&metrics);
        let routes: Vec<&str> = out.iter().map(|r| r["route"].as_str().unwrap()).collect();
        assert_eq!(routes, ["/b", "/c", "/a"]);
        assert_eq!(out[0]["kind"], "slow_route");
        assert_eq!(out[0]["method"], "GET");
        assert_eq!(out[0]["count"], 10);
        let advice = out[0]["advice"].as_str().unwrap();
        assert!(
            advice.starts_with("GET /b has p95 ") && advice.contains("cache its response"),
            "{advice}"
        );
        assert!(
            out[1]["advice"]
                .as_str()
                .unwrap()
                .ends_with("within budget")
        );
    }

    #[test]
    fn a_poor_hit_rate_is_named_only_with_enough_reads() {
        assert_eq!(
            cache_hit_rate(CacheReads {
                reads: 1_000,
                hit_rate: 0.95
            }),
            None
        );
        assert_eq!(
            cache_hit_rate(CacheReads {
                reads: MIN_REQUESTS_FOR_ERROR_RATE - 1,
                hit_rate: 0.1
            }),
            None
        );
        let poor = cache_hit_rate(CacheReads {
            reads: 1_000,
            hit_rate: 0.5,
        })
        .unwrap();
        assert_eq!(
            poor,
            serde_json::json!({
                "kind": "cache_hit_rate",
                "hit_rate": 0.5,
                "reads": 1_000,
                "advice": "the cache answers 50 % of 1000 reads (under 80 %): longer TTLs or fewer tag invalidations would help",
            })
        );
    }

    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn without_a_database_slow_queries_have_no_plan_and_come_first() {
        let log = crate::slow::SlowQueryLog::new(Duration::from_millis(100), 10);
        log.observe("SELECT * FROM t WHERE id = 1", Duration::from_millis(150));
        let metrics = RequestMetrics::new(RouteTable::new(["/a"]).unwrap());
        for _ in 0..10 {
            metrics.record_request(
                &http::Method::GET,
                "/a",
                Some(200),
                Duration::from_millis(1),
            );
        }
        let out = recommendations(
            &log,
            None,
            &metrics,
            Some(CacheReads {
                reads: 1_000,
                hit_rate: 0.2,
            }),
        )
        .await;
        let kinds: Vec<&str> = out.iter().map(|r| r["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["slow_query", "slow_route", "cache_hit_rate"]);
        assert_eq!(out[0]["digest"], "SELECT * FROM t WHERE id = ?");
        assert_eq!(out[0]["plan_nodes"], Value::Null);
        assert_eq!(out[0]["count"], 1);
        assert!(
            out[0]["advice"]
                .as_str()
                .unwrap()
                .starts_with("SELECT * FROM t WHERE id = ? ran slower than 100 ms 1 times"),
            "{}",
            out[0]
        );
    }
}
