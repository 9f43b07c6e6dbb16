//! Test support for the upcoach crates.
//!
//! - [`redis_url`] / [`database_url`]: the services from `REDIS_URL` / `DATABASE_URL`,
//!   or `None` with a printed reason so the test can return early (skip). With
//!   `UPCOACH_REQUIRE_SERVICES=1` (set by `.ci/run`) a missing variable fails the test
//!   instead, so CI can never skip silently.
//! - [`PgSchema`]: a fresh Postgres schema per test, dropped afterwards.
//! - [`RedisPrefix`]: a random key prefix per test, its keys deleted afterwards (on
//!   every primary, for a prefix on the Redis Cluster of `REDIS_CLUSTER_URL`; see
//!   [`RedisPrefix::on_cluster`] and [`redis_cluster_url`]).
//! - [`Nginx`]: nginx from the project's template in front of servers under test.
//! - [`FaultProxy`]: a TCP proxy a test can [`cut`](FaultProxy::cut) and
//!   [`restore`](FaultProxy::restore) to put Redis or Postgres "down".
//! - [`PrivateRedis`]: a `redis-server` of the test's own, to restart (losing every
//!   key), freeze (`DEBUG SLEEP`) or rid of its clients (`CLIENT KILL`).
//! - [`OidcProvider`]: an independent OpenID provider (npm `oauth2-mock-server`).
//! - [`FacebookStandIn`]: a loopback stand-in for Facebook's Graph API (code exchange,
//!   `debug_token`, `/me` with `appsecret_proof`), see [`facebook`].
//! - [`AppleStandIn`]: a loopback stand-in for Sign in with Apple's `/auth/keys` and
//!   `/auth/token` (verifying the ES256 client secret), see [`apple`].
//!
//! ```no_run
//! # async fn demo() {
//! let Some(schema) = upcoach_testing::PgSchema::create().await else { return };
//! sqlx::query("CREATE TABLE t (x int)").execute(schema.pool()).await.unwrap();
//! # }
//! ```

pub mod apple;
pub mod client;
pub mod facebook;
pub mod nginx;
mod oidc;
mod private_redis;
mod proxy;
mod serve;

use std::net::SocketAddr;

pub use apple::{AppleStandIn, AppleUser};
pub use facebook::{FacebookStandIn, FacebookUser};
pub use nginx::Nginx;
pub use oidc::OidcProvider;
pub use private_redis::PrivateRedis;
pub use proxy::FaultProxy;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Set to `1` to turn a skip for a missing service variable into a failure.
pub const REQUIRE_SERVICES: &str = "UPCOACH_REQUIRE_SERVICES";

fn service_url(variable: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            let required = std::env::var(REQUIRE_SERVICES).is_ok_and(|v| v == "1");
            assert!(
                !required,
                "{variable} is not set but {REQUIRE_SERVICES}=1: this run must not skip service tests"
            );
            eprintln!(
                "skipping: {variable} is not set (set it to run this test against the real service)"
            );
            None
        }
    }
}

/// `REDIS_URL`, or `None` after printing why the test is skipped.
pub fn redis_url() -> Option<String> {
    service_url("REDIS_URL")
}

/// The environment variable naming a Redis Cluster (`redis+cluster://host:port?addr=...`,
/// as `deploy/redis-cluster.sh start` prints), for the cluster runs of the conformance
/// suites.
pub const REDIS_CLUSTER_URL: &str = "REDIS_CLUSTER_URL";

/// `REDIS_CLUSTER_URL`, or `None` after printing why the test is skipped.
pub fn redis_cluster_url() -> Option<String> {
    service_url(REDIS_CLUSTER_URL)
}

/// The `redis://` URL of each node of the cluster `url` names (seed host first, then
/// each `addr=`), with its user and password.
fn cluster_seed_urls(url: &str) -> Vec<String> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Vec::new();
    };
    let mut base = parsed.clone();
    base.set_query(None);
    base.set_path("/");
    let base = base.as_str().replacen("redis+cluster://", "redis://", 1);
    let Ok(base) = url::Url::parse(&base) else {
        return Vec::new();
    };
    let mut seeds = vec![base.to_string()];
    for (name, value) in parsed.query_pairs() {
        if let ("addr", Some((host, port))) = (name.as_ref(), value.rsplit_once(':')) {
            let mut seed = base.clone();
            if seed.set_host(Some(host)).is_ok()
                && let Ok(port) = port.parse()
                && seed.set_port(Some(port)).is_ok()
            {
                seeds.push(seed.to_string());
            }
        }
    }
    seeds
}

/// The same `redis+cluster://` URL with its seeds listed from seed `by` on (wrapping),
/// so that a second process's pub/sub connection lands on another node.
pub fn rotated_cluster_url(url: &str, by: usize) -> String {
    let mut seeds: Vec<String> = cluster_seed_urls(url)
        .iter()
        .filter_map(|seed| {
            let seed = url::Url::parse(seed).ok()?;
            Some(format!("{}:{}", seed.host_str()?, seed.port()?))
        })
        .collect();
    if seeds.is_empty() {
        return url.to_owned();
    }
    let by = by % seeds.len();
    seeds.rotate_left(by);
    let userinfo = url::Url::parse(url)
        .ok()
        .filter(|u| !u.username().is_empty() || u.password().is_some())
        .map(|u| format!("{}:{}@", u.username(), u.password().unwrap_or("")))
        .unwrap_or_default();
    let rest: Vec<String> = seeds[1..].iter().map(|s| format!("addr={s}")).collect();
    format!(
        "redis+cluster://{userinfo}{}{}{}",
        seeds[0],
        if rest.is_empty() { "" } else { "?" },
        rest.join("&")
    )
}

/// `DATABASE_URL`, or `None` after printing why the test is skipped.
pub fn database_url() -> Option<String> {
    service_url("DATABASE_URL")
}

/// The host and port of a `redis://` or `postgres://` URL, resolved to an address.
pub fn service_addr(url: &str) -> SocketAddr {
    let parsed = url::Url::parse(url).unwrap_or_else(|e| panic!("{url:?} is not a URL: {e}"));
    let host = parsed.host_str().unwrap_or("127.0.0.1");
    let port = parsed
        .port_or_known_default()
        .unwrap_or(match parsed.scheme() {
            "redis" | "rediss" => 6379,
            _ => 5432,
        });
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!(
        "{}:{port}",
        if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        }
    )
    .parse()
    .unwrap_or_else(|e| panic!("cannot use {url:?} as an address: {e}"))
}

/// `url` with its host and port replaced by `addr` (to go through a [`FaultProxy`]).
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let mut parsed = url::Url::parse(url).unwrap_or_else(|e| panic!("{url:?} is not a URL: {e}"));
    parsed
        .set_host(Some(&addr.ip().to_string()))
        .expect("an IP address is a valid host");
    parsed
        .set_port(Some(addr.port()))
        .expect("the URL can have a port");
    parsed.into()
}

/// A fresh Postgres schema for one test, with a pool whose connections use it as
/// `search_path`. Dropped (with everything in it) when this value is dropped.
#[derive(Debug)]
pub struct PgSchema {
    name: String,
    url: String,
    pool: PgPool,
}

impl PgSchema {
    /// Creates `test_<random>` in `DATABASE_URL`'s database; `None` (skip) when unset.
    pub async fn create() -> Option<Self> {
        let url = database_url()?;
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("DATABASE_URL is set but Postgres does not answer: {e}"));
        // `name` is `test_` and 32 hex digits, made here.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&admin)
            .await
            .expect("create test schema");
        admin.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(Self::options_for(&url, &name))
            .await
            .expect("connect to the test schema");
        Some(Self { name, url, pool })
    }

    fn options_for(url: &str, schema: &str) -> PgConnectOptions {
        url.parse::<PgConnectOptions>()
            .expect("DATABASE_URL parses")
            .options([("search_path", schema)])
    }

    /// The schema's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A pool whose connections use this schema.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Connection options for this schema, to build another pool (through a proxy:
    /// `.host(..).port(..)`).
    pub fn connect_options(&self) -> PgConnectOptions {
        Self::options_for(&self.url, &self.name)
    }

    /// The `DATABASE_URL` this schema lives in.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // Drop may run inside the test's runtime, so do the async work on a thread of
        // its own with a runtime of its own.
        let url = self.url.clone();
        let name = self.name.clone();
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for schema cleanup");
            rt.block_on(async move {
                if let Ok(admin) = PgPoolOptions::new().max_connections(1).connect(&url).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS {name} CASCADE"
                    )))
                    .execute(&admin)
                    .await;
                    admin.close().await;
                }
            });
        });
        let _ = done.join();
    }
}

/// A random key prefix for one test (`test:<random>:`); its keys are deleted on drop.
#[derive(Debug)]
pub struct RedisPrefix {
    url: String,
    prefix: String,
}

impl RedisPrefix {
    /// A new prefix on `REDIS_URL`; `None` (skip) when unset.
    pub fn create() -> Option<Self> {
        Some(Self::on(redis_url()?))
    }

    /// A new prefix on the Redis Cluster of `REDIS_CLUSTER_URL`; `None` (skip) when
    /// unset.
    pub fn on_cluster() -> Option<Self> {
        Some(Self::on(redis_cluster_url()?))
    }

    fn on(url: String) -> Self {
        Self {
            url,
            prefix: format!("test:{}:", uuid::Uuid::new_v4().simple()),
        }
    }

    /// Whether this prefix is on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.url.starts_with("redis+cluster://")
    }

    /// The prefix, ending in `:`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `prefix` + `key`.
    pub fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The `REDIS_URL`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// The primaries of the cluster that `seeds` belong to, as `redis://` URLs with the
/// seeds' credentials (from `CLUSTER NODES` on the first seed that answers).
async fn cluster_primaries(seeds: &[String]) -> Vec<String> {
    for seed in seeds {
        let Ok(client) = redis::Client::open(seed.as_str()) else {
            continue;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            continue;
        };
        let Ok(nodes): redis::RedisResult<String> = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
        else {
            continue;
        };
        let Ok(base) = url::Url::parse(seed) else {
            continue;
        };
        return nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let flags = fields.get(2)?;
                if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                    return None;
                }
                let addr = fields.get(1)?.split(['@', ',']).next()?;
                let (host, port) = addr.rsplit_once(':')?;
                let mut url = base.clone();
                url.set_host(Some(host)).ok()?;
                url.set_port(Some(port.parse().ok()?)).ok()?;
                Some(url.to_string())
            })
            .collect();
    }
    Vec::new()
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        let url = self.url.clone();
        let cluster = self.is_cluster();
        let pattern = format!("{}*", self.prefix);
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for key cleanup");
            rt.block_on(async move {
                let nodes = if cluster {
                    cluster_primaries(&cluster_seed_urls(&url)).await
                } else {
                    vec![url]
                };
                for node in nodes {
                    delete_matching(&node, &pattern).await;
                }
            });
        });
        let _ = done.join();
    }
}

/// Deletes the keys matching `pattern` on the one node `url` names, one `DEL` per key
/// (keys of different cluster slots cannot share one).
async fn delete_matching(url: &str, pattern: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let mut cursor: u64 = 0;
    loop {
        let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
        else {
            return;
        };
        if !keys.is_empty() {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("DEL").arg(key).ignore();
            }
            let _: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
