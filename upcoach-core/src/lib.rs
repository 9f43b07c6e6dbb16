//! The shared vocabulary of the upcoach crates.
//!
//! - Who is calling: [`Principal`], [`UserId`], [`Role`], [`SessionId`], and the
//!   [`TokenVerifier`] seam that turns a bearer token into a principal.
//! - Time: [`Clock`], with [`SystemClock`] and the tests' [`ManualClock`].
//! - Settings from the environment: [`config::Env`], which every crate's settings read
//!   through, and core's own [`config::ServicesConfig`] (Redis, Postgres).
//! - The audit log: [`event::EventLog`], in memory or batched into Postgres.
//! - Postgres (feature `postgres`): the pool and the embedded migrations.
//! - Redis (feature `redis`): a self-reconnecting connection that reports its state.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use upcoach_core::{Clock, ManualClock, Principal, Role, SessionId, UserId};
//!
//! let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
//! let admin = Principal::new(UserId::new(), vec![Role::ADMIN], SessionId::new(),
//!     clock.now() + Duration::from_secs(60));
//! assert!(admin.is_admin() && !admin.is_expired(&clock));
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod clock;
pub mod config;
pub mod event;
pub mod health;
#[cfg(feature = "http")]
pub mod http;
pub mod limit;
pub mod principal;
pub mod secret;
pub mod token;

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "testing")]
pub mod testing;

pub use clock::{Clock, ManualClock, SystemClock};
pub use principal::{Principal, Role, SessionId, UserId};
pub use secret::Secret;
pub use token::{TokenError, TokenVerifier};
