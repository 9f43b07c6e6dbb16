//! upcoach: multi-provider social login, live dashboard updates over WebSocket and
//! Server-Sent Events, a Redis-backed tiered cache and performance monitoring, as
//! crates any Rust server can embed.
//!
//! This crate only re-exports the others; its features `redis` and `postgres` turn on
//! the matching backends.
//!
//! ```
//! use upcoach::core::Role;
//! use upcoach::core::config::ServicesConfig;
//!
//! let services = ServicesConfig::default();
//! assert!(services.redis_url.is_none(), "in-memory backends by default");
//! assert_eq!(Role::ADMIN.as_str(), "admin");
//! ```

pub use upcoach_auth as auth;
pub use upcoach_cache as cache;
pub use upcoach_core as core;
pub use upcoach_dashboard as dashboard;
pub use upcoach_perf as perf;
pub use upcoach_realtime as realtime;
