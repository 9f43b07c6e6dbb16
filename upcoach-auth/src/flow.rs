//! One-time, short-lived values by key: the state of an authorization-code flow (state
//! → nonce, PKCE verifier, provider, expected issuer, redirect URI, `return_to`, browser
//! binding) and login codes.
//!
//! - [`FlowStore`]: bytes by key; [`put`](FlowStore::put) never overwrites a live key and
//!   [`take`](FlowStore::take) hands a value out at most once, ever, also to concurrent
//!   callers.
//! - [`MemoryFlowStore`]: in process, expiry by a [`Clock`](upcoach_core::Clock), bounded
//!   by entries and bytes.
//! - `RedisFlowStore` (feature `redis`): `SET … PX … NX` and `GETDEL` on one
//!   self-reconnecting connection, so any process can finish a flow another started.
//! - [`FlowStoreExt`]: the same as JSON, for any serde type.
//!
//! Every store refuses the same things: an empty key, a key over [`MAX_KEY_LEN`] bytes or
//! with bytes outside printable ASCII, a value over [`MAX_VALUE_LEN`] bytes, and a time to
//! live of zero or over [`MAX_TTL`].
//!
//! ```
//! use std::time::Duration;
//! use upcoach_auth::flow::{FlowError, FlowStore, FlowStoreExt, MemoryFlowStore};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let store = MemoryFlowStore::new();
//! store.put_json("login:k7Qx", &("user-42", 3), Duration::from_secs(60)).await?;
//! let code: Option<(String, u32)> = store.take_json("login:k7Qx").await?;
//! assert_eq!(code, Some(("user-42".to_owned(), 3)));
//! // Taken once: gone for everyone after that.
//! assert_eq!(store.take("login:k7Qx").await?, None);
//! # Ok::<(), FlowError>(())
//! # }).unwrap();
//! ```
//!
//! Implementing a store (a map without expiry or bounds, for illustration only):
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use std::time::Duration;
//! use async_trait::async_trait;
//! use upcoach_auth::flow::{self, FlowError, FlowStore};
//!
//! #[derive(Debug, Default)]
//! struct MapFlowStore(Mutex<HashMap<String, Vec<u8>>>);
//!
//! #[async_trait]
//! impl FlowStore for MapFlowStore {
//!     async fn put(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), FlowError> {
//!         flow::check_entry(key, value, ttl)?;
//!         let mut map = self.0.lock().unwrap();
//!         if map.contains_key(key) {
//!             return Err(FlowError::KeyExists);
//!         }
//!         map.insert(key.to_owned(), value.to_vec());
//!         Ok(())
//!     }
//!     async fn take(&self, key: &str) -> Result<Option<Vec<u8>>, FlowError> {
//!         flow::check_key(key)?;
//!         Ok(self.0.lock().unwrap().remove(key))
//!     }
//! }
//! ```

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

mod memory;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
pub use self::redis::RedisFlowStore;
pub use memory::{MemoryFlowStore, MemoryFlowStoreBuilder};

/// The longest time a value may live: one day (a native sign-in's nonce is kept as
/// long as its id token is accepted).
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// The longest key, in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// The largest value, in bytes (16 KiB).
pub const MAX_VALUE_LEN: usize = 16 * 1024;

/// What can go wrong in a flow store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// The key is empty, too long or has a byte outside printable ASCII.
    #[error("invalid flow key: {reason}")]
    InvalidKey {
        /// Why.
        reason: &'static str,
    },
    /// The time to live is zero or longer than [`MAX_TTL`].
    #[error("invalid time to live {ttl:?}: expected more than zero and at most one day")]
    InvalidTtl {
        /// The refused value.
        ttl: Duration,
    },
    /// The value is larger than [`MAX_VALUE_LEN`].
    #[error("the flow value is {len} bytes; at most {max} are allowed")]
    ValueTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A live value already has this key. Keys are meant to be random, so this is a
    /// collision (or a replayed write), never an update.
    #[error("a live flow value already has this key")]
    KeyExists,
    /// The store holds as many entries or bytes as it may; expired entries were swept
    /// first. Retrying after entries expire can succeed.
    #[error("the flow store is full ({entries} entries, {bytes} bytes held)")]
    Full {
        /// Entries held.
        entries: usize,
        /// Bytes held (keys and values).
        bytes: usize,
    },
    /// A value could not be turned into or out of JSON ([`FlowStoreExt`]).
    #[error("flow value could not be (de)serialized")]
    Serde(#[source] serde_json::Error),
    /// The backend failed or did not answer in time.
    #[error("{backend} flow store backend failed")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl FlowError {
    /// A stable, snake_case code for clients and logs.
    pub fn code(&self) -> &'static str {
        match self {
            FlowError::InvalidKey { .. } => "invalid_flow_key",
            FlowError::InvalidTtl { .. } => "invalid_flow_ttl",
            FlowError::ValueTooLarge { .. } => "flow_value_too_large",
            FlowError::KeyExists => "flow_key_exists",
            FlowError::Full { .. } => "flow_store_full",
            FlowError::Serde(_) => "invalid_flow_value",
            FlowError::Backend { .. } => "flow_store_unavailable",
        }
    }

    /// Whether trying again later could succeed: a backend failure or a full store.
    pub fn is_retryable(&self) -> bool {
        matches!(self, FlowError::Backend { .. } | FlowError::Full { .. })
    }
}

/// Refuses a key every store refuses: empty, over [`MAX_KEY_LEN`] bytes, or with a byte
/// outside printable ASCII (`!` to `~`; no spaces or control characters).
pub fn check_key(key: &str) -> Result<(), FlowError> {
    if key.is_empty() {
        return Err(FlowError::InvalidKey {
            reason: "the key is empty",
        });
    }
    if key.len() > MAX_KEY_LEN {
        return Err(FlowError::InvalidKey {
            reason: "the key is longer than 256 bytes",
        });
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FlowError::InvalidKey {
            reason: "the key has a byte outside printable ASCII",
        });
    }
    Ok(())
}

/// Refuses what every store refuses in a [`put`](FlowStore::put): a bad key
/// ([`check_key`]), a value over [`MAX_VALUE_LEN`], a time to live of zero or over
/// [`MAX_TTL`].
pub fn check_entry(key: &str, value: &[u8], ttl: Duration) -> Result<(), FlowError> {
    check_key(key)?;
    if value.len() > MAX_VALUE_LEN {
        return Err(FlowError::ValueTooLarge {
            len: value.len(),
            max: MAX_VALUE_LEN,
        });
    }
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(FlowError::InvalidTtl { ttl });
    }
    Ok(())
}

/// One-time, short-lived values by key.
///
/// - [`put`](Self::put) stores a value for `ttl` and refuses with
///   [`FlowError::KeyExists`] while a live value has the key.
/// - [`take`](Self::take) returns the value and removes it in one atomic step: of any
///   number of concurrent takes of one key, exactly one gets it, and no later take does.
/// - An expired value is never returned.
///
/// Both refuse what [`check_entry`] / [`check_key`] refuse. See the [module
/// docs](self) for an example of implementing a store; run
/// `upcoach_auth::testing::flow::flow_store_conformance` (feature `testing`) against it.
#[async_trait]
pub trait FlowStore: fmt::Debug + Send + Sync + 'static {
    /// Stores `value` under `key` for `ttl`, unless a live value already has that key.
    async fn put(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), FlowError>;

    /// Removes the value under `key` and returns it; `None` when there is none (never
    /// stored, expired, or taken already).
    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>, FlowError>;
}

/// Typed (serde JSON) helpers over any [`FlowStore`].
#[async_trait]
pub trait FlowStoreExt: FlowStore {
    /// Stores `value` as JSON under `key` for `ttl` (see [`FlowStore::put`]).
    async fn put_json<T: Serialize + Sync + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<(), FlowError> {
        let bytes = serde_json::to_vec(value).map_err(FlowError::Serde)?;
        self.put(key, &bytes, ttl).await
    }

    /// Takes the value under `key` and decodes it from JSON (see [`FlowStore::take`]). A
    /// value that does not decode is an error, and it is gone all the same.
    async fn take_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, FlowError> {
        match self.take(key).await? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(FlowError::Serde),
            None => Ok(None),
        }
    }
}

impl<S: FlowStore + ?Sized> FlowStoreExt for S {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(check_key("state:AbC-_~.123").is_ok());
        assert!(check_key(&"k".repeat(MAX_KEY_LEN)).is_ok());
        for bad in ["", " ", "a b", "tab\t", "line\n", "ключ", "nul\0"] {
            assert!(
                matches!(check_key(bad), Err(FlowError::InvalidKey { .. })),
                "{bad:?}"
            );
        }
        assert!(check_key(&"k".repeat(MAX_KEY_LEN + 1)).is_err());
    }

    #[test]
    fn entries_are_checked() {
        let ttl = Duration::from_secs(60);
        assert!(check_entry("k", &[0; MAX_VALUE_LEN], MAX_TTL).is_ok());
        assert!(matches!(
            check_entry("k", &[0; MAX_VALUE_LEN + 1], ttl),
            Err(FlowError::ValueTooLarge { len, max: MAX_VALUE_LEN }) if len == MAX_VALUE_LEN + 1
        ));
        for bad in [Duration::ZERO, MAX_TTL + Duration::from_millis(1)] {
            assert!(matches!(
                check_entry("k", b"v", bad),
                Err(FlowError::InvalidTtl { .. })
            ));
        }
    }

    #[test]
    fn codes_are_stable() {
        assert_eq!(FlowError::KeyExists.code(), "flow_key_exists");
        assert!(!FlowError::KeyExists.is_retryable());
        let full = FlowError::Full {
            entries: 1,
            bytes: 1,
        };
        assert!(full.is_retryable());
        assert_eq!(full.code(), "flow_store_full");
    }
}
