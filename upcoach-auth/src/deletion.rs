//! Data-deletion requests: what Facebook's data deletion request callback leaves behind,
//! so the person can follow their request with a confirmation code.
//!
//! When a person asks Facebook to delete what our app holds on them, Facebook POSTs a
//! `signed_request` to the server, which acts on it (ends the person's sessions, removes
//! the identity), [records](DeletionStore::record) the request,
//! [completes](DeletionStore::complete) it with what it found, and answers
//! `{"url": "<status URL>", "confirmation_code": "<code>"}`. Whoever holds the code can
//! then [look the request up](DeletionStore::get) at the status URL.
//!
//! What every store does:
//!
//! - **One request per person.** Recording the same (provider, subject) again while its
//!   request is kept returns that request, whatever its status (Facebook retries a
//!   callback until it gets an answer). Two concurrent records of one subject make one
//!   request.
//! - **Kept for [`RETENTION`]** (90 days) after `requested_at`, then forgotten:
//!   [`get`](DeletionStore::get) and [`complete`](DeletionStore::complete) answer `None`,
//!   and recording the subject again makes a new request with a new code.
//! - **Completed once.** The first [`complete`](DeletionStore::complete) sets the status,
//!   the [`DeletionOutcome`] and `completed_at`; later ones change nothing.
//! - **Nothing about the person in clear.** The subject (the person's id at the
//!   provider) is kept only as its [`SubjectHash`], the SHA-256 of
//!   `provider \0 subject`, for the one thing a store needs it for: finding the request a
//!   retried callback already made. The hash is plain, not keyed: every process and
//!   every backend finds the same request without sharing one more secret. It is a
//!   pseudonym, not anonymity (whoever already knows a subject can tell whether it asked
//!   for deletion within the last 90 days), but nothing stored reveals a subject, and it
//!   goes with the request after [`RETENTION`]. Facebook's subjects are app-scoped ids,
//!   which mean nothing outside our app.
//! - **Codes of one shape.** A [`ConfirmationCode`] is 16 random bytes from the operating
//!   system, base64url without padding (22 characters); [`ConfirmationCode::parse`]
//!   refuses anything else, so a status route can answer 404 for a malformed code
//!   without asking the store.
//! - **Times to the microsecond** (what Postgres keeps), in every backend.
//!
//! Backends: [`MemoryDeletionStore`] (always built, bounded) and `PgDeletionStore`
//! (feature `postgres`, table `data_deletion_requests`), both held to
//! `upcoach_auth::testing::deletion::deletion_store_conformance`.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use upcoach_auth::ProviderId;
//! use upcoach_auth::deletion::{
//!     ConfirmationCode, DeletionError, DeletionOutcome, DeletionStatus, DeletionStore,
//!     MemoryDeletionStore, RETENTION,
//! };
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let store = MemoryDeletionStore::new();
//! let facebook: ProviderId = "facebook".parse().unwrap();
//! let now = SystemTime::now();
//!
//! // The callback: record, act, complete, answer with the code.
//! let request = store.record(facebook, "10158872345", now).await?;
//! assert_eq!(request.status, DeletionStatus::Pending);
//! let done = store.complete(&request.code, DeletionOutcome::IdentityRemoved, now).await?;
//! assert_eq!(done.unwrap().status, DeletionStatus::Completed);
//!
//! // Facebook retries the callback: the same request, the same code.
//! let retried = store.record(facebook, "10158872345", now + Duration::from_secs(30)).await?;
//! assert_eq!(retried.code, request.code);
//!
//! // The status page, from the code in its URL.
//! let code = ConfirmationCode::parse(request.code.as_str()).expect("our own code");
//! let shown = store.get(&code, now + Duration::from_secs(3600)).await?.unwrap();
//! assert_eq!(shown.outcome, Some(DeletionOutcome::IdentityRemoved));
//! assert!(ConfirmationCode::parse("not-a-code").is_none());
//!
//! // Forgotten after 90 days.
//! assert_eq!(store.get(&code, now + RETENTION).await?, None);
//! # Ok::<(), DeletionError>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::ProviderId;
use crate::refresh::{later, to_micros};

mod code;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;

pub use code::{CODE_BYTES, CODE_LEN, ConfirmationCode, SubjectHash};
pub use memory::MemoryDeletionStore;
#[cfg(feature = "postgres")]
pub use postgres::PgDeletionStore;

/// How long a request is kept after `requested_at`: 90 days. After that it is forgotten.
pub const RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

/// The longest subject accepted, in bytes (as for identities:
/// [`users::MAX_SUBJECT_LEN`](crate::users::MAX_SUBJECT_LEN)).
pub const MAX_SUBJECT_LEN: usize = crate::users::MAX_SUBJECT_LEN;

/// Where a request stands.
///
/// Serializes as `"pending"` or `"completed"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletionStatus {
    /// Recorded; the deletion has not been reported done yet.
    Pending,
    /// Done; the request's [`DeletionOutcome`] says what was found.
    Completed,
}

impl DeletionStatus {
    /// `pending` or `completed`, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            DeletionStatus::Pending => "pending",
            DeletionStatus::Completed => "completed",
        }
    }

    /// The status named `name` (what [`as_str`](Self::as_str) gives), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        [DeletionStatus::Pending, DeletionStatus::Completed]
            .into_iter()
            .find(|s| s.as_str() == name)
    }
}

impl fmt::Display for DeletionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a completed deletion found.
///
/// Serializes as `"identity_removed"` or `"nothing_found"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletionOutcome {
    /// The person's identity (and what hung on it) was found and removed.
    IdentityRemoved,
    /// We held nothing for this person.
    NothingFound,
}

impl DeletionOutcome {
    /// `identity_removed` or `nothing_found`, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            DeletionOutcome::IdentityRemoved => "identity_removed",
            DeletionOutcome::NothingFound => "nothing_found",
        }
    }

    /// The outcome named `name` (what [`as_str`](Self::as_str) gives), if any.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            DeletionOutcome::IdentityRemoved,
            DeletionOutcome::NothingFound,
        ]
        .into_iter()
        .find(|o| o.as_str() == name)
    }
}

impl fmt::Display for DeletionOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One data-deletion request, as its status page shows it.
///
/// `outcome` and `completed_at` are set exactly when `status` is
/// [`Completed`](DeletionStatus::Completed); every store keeps it so. Nothing here names
/// the person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletionRequest {
    /// The code the person follows the request with.
    pub code: ConfirmationCode,
    /// The provider that sent the request.
    pub provider: ProviderId,
    /// Pending or completed.
    pub status: DeletionStatus,
    /// What the deletion found, once completed.
    pub outcome: Option<DeletionOutcome>,
    /// When the request was first recorded (to the microsecond).
    pub requested_at: SystemTime,
    /// When it was first completed (to the microsecond).
    pub completed_at: Option<SystemTime>,
}

impl DeletionRequest {
    /// A pending request recorded at `requested_at` (kept to the microsecond).
    pub fn new(code: ConfirmationCode, provider: ProviderId, requested_at: SystemTime) -> Self {
        Self {
            code,
            provider,
            status: DeletionStatus::Pending,
            outcome: None,
            requested_at: to_micros(requested_at),
            completed_at: None,
        }
    }

    /// Completes a pending request with `outcome` at `at` (kept to the microsecond); a
    /// completed one keeps its first completion. `true` if this call completed it.
    pub fn complete(&mut self, outcome: DeletionOutcome, at: SystemTime) -> bool {
        if self.status == DeletionStatus::Completed {
            return false;
        }
        self.status = DeletionStatus::Completed;
        self.outcome = Some(outcome);
        self.completed_at = Some(to_micros(at));
        true
    }

    /// When the request is forgotten: `requested_at` + [`RETENTION`].
    pub fn expires_at(&self) -> SystemTime {
        later(self.requested_at, RETENTION)
    }

    /// Whether the request is forgotten at `now` (from [`expires_at`](Self::expires_at)
    /// on).
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.expires_at()
    }
}

/// What can go wrong in a deletion store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeletionError {
    /// The subject is empty, longer than [`MAX_SUBJECT_LEN`] bytes or has a NUL
    /// character.
    #[error("invalid subject: {reason}")]
    InvalidSubject {
        /// Why.
        reason: &'static str,
    },
    /// The store holds as many requests as it may, none of them past [`RETENTION`]
    /// (expired ones were dropped first); nothing was recorded. Retrying after requests
    /// expire can succeed.
    #[error("the deletion store is full ({capacity} requests kept)")]
    Full {
        /// The store's capacity.
        capacity: usize,
    },
    /// The operating system's randomness failed, so no code could be made.
    #[error("no confirmation code could be generated")]
    Random(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Stored data is not what this crate writes (a malformed code, an unknown provider,
    /// status or outcome).
    #[error("stored deletion request is corrupt: {reason}")]
    Corrupt {
        /// What was wrong.
        reason: &'static str,
    },
    /// The backend failed or did not answer in time (Postgres down, say).
    #[error("{backend} deletion store backend failed")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl DeletionError {
    /// A stable, snake_case code for clients and logs.
    pub fn code(&self) -> &'static str {
        match self {
            DeletionError::InvalidSubject { .. } => "invalid_subject",
            DeletionError::Full { .. } => "deletion_store_full",
            DeletionError::Random(_) | DeletionError::Corrupt { .. } => "internal_error",
            DeletionError::Backend { .. } => "deletion_store_unavailable",
        }
    }

    /// Whether trying again later could succeed: a backend failure or a full store.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DeletionError::Backend { .. } | DeletionError::Full { .. }
        )
    }
}

/// Refuses a subject no store records: empty, over [`MAX_SUBJECT_LEN`] bytes, or with a
/// NUL character (no identity has such a subject).
pub fn check_subject(subject: &str) -> Result<(), DeletionError> {
    let invalid = |reason| Err(DeletionError::InvalidSubject { reason });
    if subject.is_empty() {
        return invalid("the subject is empty");
    }
    if subject.len() > MAX_SUBJECT_LEN {
        return invalid("the subject is longer than 255 bytes");
    }
    if subject.contains('\0') {
        return invalid("the subject contains a NUL character");
    }
    Ok(())
}

/// Data-deletion requests by confirmation code, one per person at a time.
///
/// The rules every store follows are in the [module docs](self). Every call takes the
/// current time, which decides retention (keep the stores' callers on one clock). A store
/// of your own passes `upcoach_auth::testing::deletion::deletion_store_conformance`
/// (feature `testing`); one that never forgets and has no bound, for illustration only:
///
/// ```
/// use std::sync::Mutex;
/// use std::time::SystemTime;
/// use async_trait::async_trait;
/// use upcoach_auth::ProviderId;
/// use upcoach_auth::deletion::{
///     self, ConfirmationCode, DeletionError, DeletionOutcome, DeletionRequest,
///     DeletionStore, SubjectHash,
/// };
///
/// #[derive(Debug, Default)]
/// struct ListDeletionStore(Mutex<Vec<(SubjectHash, DeletionRequest)>>);
///
/// #[async_trait]
/// impl DeletionStore for ListDeletionStore {
///     async fn record(
///         &self,
///         provider: ProviderId,
///         subject: &str,
///         now: SystemTime,
///     ) -> Result<DeletionRequest, DeletionError> {
///         deletion::check_subject(subject)?;
///         let hash = SubjectHash::of(&provider, subject);
///         let mut list = self.0.lock().unwrap();
///         list.retain(|(_, r)| !r.is_expired(now));
///         if let Some((_, kept)) = list.iter().find(|(h, _)| *h == hash) {
///             return Ok(kept.clone());
///         }
///         let request = DeletionRequest::new(ConfirmationCode::generate()?, provider, now);
///         list.push((hash, request.clone()));
///         Ok(request)
///     }
///
///     async fn complete(
///         &self,
///         code: &ConfirmationCode,
///         outcome: DeletionOutcome,
///         now: SystemTime,
///     ) -> Result<Option<DeletionRequest>, DeletionError> {
///         let mut list = self.0.lock().unwrap();
///         let found = list.iter_mut().find(|(_, r)| r.code == *code && !r.is_expired(now));
///         Ok(found.map(|(_, r)| {
///             r.complete(outcome, now);
///             r.clone()
///         }))
///     }
///
///     async fn get(
///         &self,
///         code: &ConfirmationCode,
///         now: SystemTime,
///     ) -> Result<Option<DeletionRequest>, DeletionError> {
///         let list = self.0.lock().unwrap();
///         let found = list.iter().find(|(_, r)| r.code == *code && !r.is_expired(now));
///         Ok(found.map(|(_, r)| r.clone()))
///     }
/// }
/// ```
#[async_trait]
pub trait DeletionStore: fmt::Debug + Send + Sync + 'static {
    /// Records a request of `provider`'s `subject` at `now`: a new pending request with a
    /// fresh code, or the subject's request if one is still kept (whatever its status).
    /// Refuses an invalid subject ([`check_subject`]).
    async fn record(
        &self,
        provider: ProviderId,
        subject: &str,
        now: SystemTime,
    ) -> Result<DeletionRequest, DeletionError>;

    /// Completes the request with `outcome` at `now` and returns it; a completed request
    /// keeps its first completion and is returned as it is. `None` for a code no request
    /// has, or one past [`RETENTION`].
    async fn complete(
        &self,
        code: &ConfirmationCode,
        outcome: DeletionOutcome,
        now: SystemTime,
    ) -> Result<Option<DeletionRequest>, DeletionError>;

    /// The request with this code at `now`; `None` for a code no request has, or one past
    /// [`RETENTION`].
    async fn get(
        &self,
        code: &ConfirmationCode,
        now: SystemTime,
    ) -> Result<Option<DeletionRequest>, DeletionError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for status in [DeletionStatus::Pending, DeletionStatus::Completed] {
            assert_eq!(DeletionStatus::from_name(status.as_str()), Some(status));
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::json!(status.as_str())
            );
        }
        for outcome in [
            DeletionOutcome::IdentityRemoved,
            DeletionOutcome::NothingFound,
        ] {
            assert_eq!(DeletionOutcome::from_name(outcome.as_str()), Some(outcome));
            assert_eq!(
                serde_json::to_value(outcome).unwrap(),
                serde_json::json!(outcome.as_str())
            );
        }
        assert_eq!(DeletionStatus::from_name("Pending"), None);
        assert_eq!(DeletionOutcome::from_name(""), None);
    }

    #[test]
    fn requests_complete_once_and_expire_after_retention() {
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_800_000_000, 123_456_789);
        let facebook = "facebook".parse().unwrap();
        let mut request = DeletionRequest::new(ConfirmationCode::generate().unwrap(), facebook, at);
        assert_eq!(
            request.requested_at,
            SystemTime::UNIX_EPOCH + Duration::new(1_800_000_000, 123_456_000),
            "kept to the microsecond"
        );
        assert!(request.complete(DeletionOutcome::NothingFound, at));
        assert!(!request.complete(DeletionOutcome::IdentityRemoved, at + RETENTION));
        assert_eq!(request.outcome, Some(DeletionOutcome::NothingFound));
        assert_eq!(request.completed_at, Some(request.requested_at));
        assert!(!request.is_expired(request.expires_at() - Duration::from_micros(1)));
        assert!(request.is_expired(request.expires_at()));
    }

    #[test]
    fn subjects_are_checked_and_errors_have_codes() {
        assert!(check_subject("10158872345").is_ok());
        for bad in [
            String::new(),
            "s".repeat(MAX_SUBJECT_LEN + 1),
            "a\0b".into(),
        ] {
            let err = check_subject(&bad).unwrap_err();
            assert_eq!(err.code(), "invalid_subject");
            assert!(!err.is_retryable());
        }
        let full = DeletionError::Full { capacity: 3 };
        assert_eq!(full.code(), "deletion_store_full");
        assert!(full.is_retryable());
        let down = DeletionError::Backend {
            backend: "postgres",
            source: "connection refused".into(),
        };
        assert_eq!(down.code(), "deletion_store_unavailable");
        assert!(down.is_retryable());
    }
}
