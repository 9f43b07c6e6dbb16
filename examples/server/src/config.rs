//! The server's settings: its own (`UPCOACH_ADDR`, `UPCOACH_METRICS_PUBLIC`) and each
//! crate's, read together so every problem is reported at once.

use std::net::SocketAddr;

use upcoach_auth::config::AuthConfig;
use upcoach_auth::threat::ThreatConfig;
use upcoach_cache::CacheConfig;
use upcoach_core::config::{Env, ServicesConfig, Settings};
use upcoach_core::http::protect::LimitConfig;
use upcoach_perf::PerfConfig;
use upcoach_realtime::HubConfig;

/// The default listening address.
pub(crate) const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

/// Everything the reference server reads from the environment.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// `UPCOACH_ADDR`: where it listens (default `127.0.0.1:8080`).
    pub addr: SocketAddr,
    /// `UPCOACH_METRICS_PUBLIC`: whether `GET /metrics` answers anyone (default true)
    /// or only an admin.
    pub metrics_public: bool,
    /// Redis and Postgres.
    pub services: ServicesConfig,
    /// Sign-in.
    pub auth: AuthConfig,
    /// Realtime limits and allowed origins.
    pub realtime: HubConfig,
    /// The cache (and the prefix of every Redis key of the server).
    pub cache: CacheConfig,
    /// Performance monitoring.
    pub perf: PerfConfig,
    /// Rate limits, trusted proxies and connection caps.
    pub limits: LimitConfig,
    /// Threat detection.
    pub threat: ThreatConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: DEFAULT_ADDR,
            metrics_public: true,
            services: ServicesConfig::default(),
            auth: AuthConfig::default(),
            realtime: HubConfig::default(),
            cache: CacheConfig::default(),
            perf: PerfConfig::default(),
            limits: LimitConfig::default(),
            threat: ThreatConfig::default(),
        }
    }
}

impl Settings for ServerConfig {
    fn read(env: &mut Env<'_>) -> Self {
        Self {
            addr: env.socket_addr("UPCOACH_ADDR", DEFAULT_ADDR),
            services: ServicesConfig::read(env),
            realtime: HubConfig::read(env),
            cache: CacheConfig::read(env),
            perf: PerfConfig::read(env),
            metrics_public: env.flag("UPCOACH_METRICS_PUBLIC", true),
            auth: AuthConfig::read(env),
            limits: LimitConfig::read(env),
            threat: ThreatConfig::read(env),
        }
    }
}

impl ServerConfig {
    /// `UPCOACH_PUBLIC_URL`, or `http://` + the listening address.
    pub fn public_url(&self) -> String {
        self.auth
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.addr))
    }
}
