//! upcoach: multi-provider social login, live dashboard updates over WebSocket and
//! Server-Sent Events, a Redis-backed tiered cache and performance monitoring, as
//! crates any Rust server can embed.
//!
//! This crate only re-exports the others; its features `redis` and `postgres` turn on
//! the matching backends.
//!
//! ```
//! use upcoach::core::{Config, Role};
//!
//! let config = Config::default();
//! assert!(config.redis_url.is_none());
//! assert_eq!(Role::ADMIN.as_str(), "admin");
//! ```

pub use upcoach_auth as auth;
pub use upcoach_cache as cache;
pub use upcoach_core as core;
pub use upcoach_perf as perf;
pub use upcoach_realtime as realtime;
