//! Caching for upcoach servers: the [`CacheStore`] seam.
//!
//! This crate is at its first step: the trait and its error type are settled so hosts
//! and the other crates can code against them. The in-process, Redis and tiered stores,
//! tags, compression, single-flight loading and the HTTP response-cache layer are not
//! built yet.
//!
//! Implementing a store (a map without expiry, for illustration only):
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use std::time::Duration;
//! use async_trait::async_trait;
//! use bytes::Bytes;
//! use upcoach_cache::{CacheStore, Result};
//!
//! #[derive(Debug, Default)]
//! struct MapStore(Mutex<HashMap<String, Bytes>>);
//!
//! #[async_trait]
//! impl CacheStore for MapStore {
//!     async fn get(&self, key: &str) -> Result<Option<Bytes>> {
//!         Ok(self.0.lock().unwrap().get(key).cloned())
//!     }
//!     async fn set(&self, key: &str, value: Bytes, _ttl: Duration) -> Result<()> {
//!         self.0.lock().unwrap().insert(key.to_owned(), value);
//!         Ok(())
//!     }
//!     async fn delete(&self, key: &str) -> Result<bool> {
//!         Ok(self.0.lock().unwrap().remove(key).is_some())
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let store = MapStore::default();
//! store.set("k", Bytes::from_static(b"v"), Duration::from_secs(60)).await?;
//! assert_eq!(store.get_many(&["k", "missing"]).await?, vec![Some(Bytes::from_static(b"v")), None]);
//! assert!(store.exists("k").await?);
//! # Ok::<(), upcoach_cache::Error>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

/// What can go wrong in a cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key cannot be stored by this backend (empty, or too long).
    #[error("invalid cache key: {reason}")]
    InvalidKey {
        /// Why.
        reason: &'static str,
    },
    /// The backend does not support this operation.
    #[error("{operation} is not supported by this cache store")]
    Unsupported {
        /// Which operation.
        operation: &'static str,
    },
    /// The backend failed or did not answer in time.
    #[error("{backend} cache backend failed")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Whether trying again later could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Backend { .. })
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Bytes by key, each entry with its own time to live.
///
/// The required surface is `get`, `set` and `delete`; the batched and existence
/// operations have default implementations that a backend overrides when it can do
/// better (one pipelined round trip to Redis, say).
#[async_trait]
pub trait CacheStore: fmt::Debug + Send + Sync + 'static {
    /// The value under `key`, if present and not expired.
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;

    /// Stores `value` under `key` for `ttl`.
    async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<()>;

    /// Removes `key`; whether it was present.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Whether `key` is present and not expired.
    async fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.get(key).await?.is_some())
    }

    /// The values under `keys`, in order.
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(self.get(key).await?);
        }
        Ok(out)
    }

    /// Stores every `(key, value, ttl)`.
    async fn set_many(&self, entries: &[(&str, Bytes, Duration)]) -> Result<()> {
        for (key, value, ttl) in entries {
            self.set(key, value.clone(), *ttl).await?;
        }
        Ok(())
    }
}
