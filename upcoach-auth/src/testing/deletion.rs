//! The conformance suite every [`DeletionStore`] passes (feature `testing`).
//!
//! ```
//! use upcoach_auth::deletion::MemoryDeletionStore;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! upcoach_auth::testing::deletion::deletion_store_conformance(&MemoryDeletionStore::new()).await;
//! # });
//! ```

use std::time::{Duration, SystemTime};

use crate::ProviderId;
use crate::deletion::{
    ConfirmationCode, DeletionOutcome, DeletionRequest, DeletionStatus, DeletionStore, RETENTION,
};
use crate::testing::users::join_all;

/// Checks an empty `store` holding at least 100 requests: recording and looking up,
/// unknown codes, one request per (provider, subject) whatever its status, completing
/// once, retention (forgotten at `requested_at` + [`RETENTION`], then a new code),
/// invalid subjects, the subject never shown by the store's `Debug`, and concurrent
/// records and completions. Times only move forward from section to section, by more
/// than [`RETENTION`]. Panics with a message at the first difference.
pub async fn deletion_store_conformance(store: &dyn DeletionStore) {
    let mut start = SystemTime::UNIX_EPOCH + Duration::new(1_900_000_000, 123_456_789);
    let mut next = || {
        let section = start;
        start += RETENTION * 2;
        section
    };
    records_and_gets(store, next()).await;
    one_request_per_subject(store, next()).await;
    completes_once(store, next()).await;
    forgets_after_retention(store, next()).await;
    refuses_invalid_subjects(store, next()).await;
    keeps_no_subject_in_clear(store, next()).await;
    concurrent_records_make_one_request(store, next()).await;
    concurrent_completions_keep_one(store, next()).await;
}

fn provider(name: &str) -> ProviderId {
    name.parse()
        .unwrap_or_else(|_| panic!("{name:?} is a provider name"))
}

fn facebook() -> ProviderId {
    provider("facebook")
}

/// `t` to the microsecond, rounded down (`t` is after 1970 here).
fn micros(t: SystemTime) -> SystemTime {
    let since = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970");
    SystemTime::UNIX_EPOCH + Duration::new(since.as_secs(), since.subsec_micros() * 1_000)
}

async fn record(
    store: &dyn DeletionStore,
    provider: ProviderId,
    subject: &str,
    now: SystemTime,
) -> DeletionRequest {
    store
        .record(provider, subject, now)
        .await
        .unwrap_or_else(|e| panic!("record of {subject:?} at {provider}: {e:?}"))
}

async fn get(
    store: &dyn DeletionStore,
    code: &ConfirmationCode,
    now: SystemTime,
) -> Option<DeletionRequest> {
    store
        .get(code, now)
        .await
        .unwrap_or_else(|e| panic!("get of {code:?}: {e:?}"))
}

async fn complete(
    store: &dyn DeletionStore,
    code: &ConfirmationCode,
    outcome: DeletionOutcome,
    now: SystemTime,
) -> Option<DeletionRequest> {
    store
        .complete(code, outcome, now)
        .await
        .unwrap_or_else(|e| panic!("complete of {code:?}: {e:?}"))
}

fn unknown_code() -> ConfirmationCode {
    ConfirmationCode::generate().expect("a code")
}

async fn records_and_gets(store: &dyn DeletionStore, t: SystemTime) {
    let request = record(store, facebook(), "rg-1", t).await;
    assert_eq!(request.provider.as_str(), "facebook");
    assert_eq!(request.status, DeletionStatus::Pending);
    assert_eq!(request.outcome, None);
    assert_eq!(request.completed_at, None);
    assert_eq!(
        request.requested_at,
        micros(t),
        "requested_at, to the microsecond"
    );
    assert_eq!(
        ConfirmationCode::parse(request.code.as_str()).as_ref(),
        Some(&request.code),
        "a code of the generated shape"
    );
    assert_eq!(get(store, &request.code, t).await.as_ref(), Some(&request));
    let day = t + Duration::from_secs(24 * 3600);
    assert_eq!(
        get(store, &request.code, day).await.as_ref(),
        Some(&request),
        "a lookup changes nothing"
    );

    assert_eq!(
        get(store, &unknown_code(), t).await,
        None,
        "an unknown code"
    );
    let lower = ConfirmationCode::parse(&request.code.as_str().to_lowercase());
    if let Some(lower) = lower.filter(|l| *l != request.code) {
        assert_eq!(
            get(store, &lower, t).await,
            None,
            "codes are case-sensitive"
        );
    }
}

async fn one_request_per_subject(store: &dyn DeletionStore, t: SystemTime) {
    let first = record(store, facebook(), "ps-1", t).await;
    let retried = record(store, facebook(), "ps-1", t + Duration::from_secs(60)).await;
    assert_eq!(retried, first, "a retried callback gets the same request");

    let other = record(store, facebook(), "ps-2", t).await;
    assert_ne!(other.code, first.code, "another subject, another request");
    let upper = record(store, facebook(), "PS-1", t).await;
    assert_ne!(upper.code, first.code, "subjects are case-sensitive");
    let google = record(store, provider("google"), "ps-1", t).await;
    assert_ne!(
        google.code, first.code,
        "the same subject at another provider"
    );
    assert_eq!(google.provider.as_str(), "google");
    assert_eq!(
        get(store, &google.code, t)
            .await
            .map(|r| r.provider.to_string()),
        Some("google".to_owned())
    );

    // Later, even completed and near the end of retention: still the same request.
    complete(store, &first.code, DeletionOutcome::NothingFound, t).await;
    let end = first.expires_at() - Duration::from_secs(1);
    let again = record(store, facebook(), "ps-1", end).await;
    assert_eq!(again.code, first.code);
    assert_eq!(
        again.requested_at, first.requested_at,
        "the first request time is kept"
    );
    assert_eq!(
        again.status,
        DeletionStatus::Completed,
        "whatever its status"
    );
}

async fn completes_once(store: &dyn DeletionStore, t: SystemTime) {
    let request = record(store, facebook(), "co-1", t).await;
    let at = t + Duration::new(5, 987_654_321);
    let done = complete(store, &request.code, DeletionOutcome::IdentityRemoved, at)
        .await
        .expect("a recorded request completes");
    assert_eq!(done.code, request.code);
    assert_eq!(done.status, DeletionStatus::Completed);
    assert_eq!(done.outcome, Some(DeletionOutcome::IdentityRemoved));
    assert_eq!(
        done.completed_at,
        Some(micros(at)),
        "completed_at, to the microsecond"
    );
    assert_eq!(done.requested_at, request.requested_at);
    assert_eq!(done.provider.as_str(), "facebook");
    assert_eq!(get(store, &request.code, at).await.as_ref(), Some(&done));

    let twice = complete(
        store,
        &request.code,
        DeletionOutcome::NothingFound,
        at + Duration::from_secs(60),
    )
    .await;
    assert_eq!(twice.as_ref(), Some(&done), "the first completion is kept");
    assert_eq!(get(store, &request.code, at).await.as_ref(), Some(&done));

    let nothing = record(store, facebook(), "co-2", t).await;
    let done = complete(store, &nothing.code, DeletionOutcome::NothingFound, t)
        .await
        .unwrap();
    assert_eq!(done.outcome, Some(DeletionOutcome::NothingFound));
    assert_eq!(done.completed_at, Some(done.requested_at));

    let unknown = unknown_code();
    assert_eq!(
        complete(store, &unknown, DeletionOutcome::IdentityRemoved, t).await,
        None,
        "an unknown code completes nothing"
    );
    assert_eq!(get(store, &unknown, t).await, None, "and makes nothing");
}

async fn forgets_after_retention(store: &dyn DeletionStore, t: SystemTime) {
    let pending = record(store, facebook(), "fr-1", t).await;
    let completed = record(store, facebook(), "fr-2", t).await;
    complete(store, &completed.code, DeletionOutcome::IdentityRemoved, t).await;
    let end = pending.expires_at();
    assert_eq!(end, micros(t) + RETENTION);
    let before = end - Duration::from_micros(1);
    for request in [&pending, &completed] {
        assert!(
            get(store, &request.code, before).await.is_some(),
            "kept until requested_at + RETENTION"
        );
        assert_eq!(
            get(store, &request.code, end).await,
            None,
            "forgotten from then on"
        );
    }
    assert_eq!(
        complete(store, &pending.code, DeletionOutcome::NothingFound, end).await,
        None,
        "a forgotten request does not complete"
    );

    // The subject again: a new request, with a new code.
    let later = end + Duration::from_secs(1);
    let again = record(store, facebook(), "fr-1", later).await;
    assert_ne!(again.code, pending.code);
    assert_eq!(again.status, DeletionStatus::Pending);
    assert_eq!(again.requested_at, micros(later));
    let again_completed = record(store, facebook(), "fr-2", later).await;
    assert_ne!(again_completed.code, completed.code);
    assert_eq!(
        again_completed.status,
        DeletionStatus::Pending,
        "not the old completion"
    );
    assert_eq!(again_completed.outcome, None);
    for request in [&pending, &completed] {
        assert_eq!(get(store, &request.code, later).await, None);
    }
    assert_eq!(get(store, &again.code, later).await.as_ref(), Some(&again));
    assert_eq!(
        record(store, facebook(), "fr-1", later + Duration::from_secs(1)).await,
        again,
        "and that one is found again"
    );
}

async fn refuses_invalid_subjects(store: &dyn DeletionStore, t: SystemTime) {
    for subject in [String::new(), "s".repeat(256), "a\0b".to_owned()] {
        match store.record(facebook(), &subject, t).await {
            Err(e) if e.code() == "invalid_subject" => assert!(!e.is_retryable()),
            other => panic!("{subject:?} should be refused with invalid_subject, got {other:?}"),
        }
    }
    let longest = "9".repeat(255);
    let request = record(store, facebook(), &longest, t).await;
    assert_eq!(record(store, facebook(), &longest, t).await, request);
    let unicode = record(store, facebook(), "Grâce — グレース 🚀", t).await;
    assert_ne!(unicode.code, request.code);
}

async fn keeps_no_subject_in_clear(store: &dyn DeletionStore, t: SystemTime) {
    let subject = "subject-in-clear-5b1d9e";
    let request = record(store, facebook(), subject, t).await;
    let shown = format!("{store:?} {request:?}");
    assert!(
        !shown.contains(subject),
        "the store keeps the subject as a hash only, yet shows it: {shown}"
    );
}

async fn concurrent_records_make_one_request(store: &dyn DeletionStore, t: SystemTime) {
    for round in 0..3 {
        let subject = format!("cr-{round}");
        let calls =
            (0..12).map(|i| store.record(facebook(), &subject, t + Duration::from_millis(i)));
        let results = join_all(calls.collect()).await;
        let requests: Vec<DeletionRequest> = results
            .into_iter()
            .map(|r| r.expect("a concurrent record succeeds"))
            .collect();
        assert!(
            requests.iter().all(|r| r.code == requests[0].code),
            "round {round}: one request for one subject: {requests:?}"
        );
        assert_eq!(
            get(store, &requests[0].code, t).await.map(|r| r.code),
            Some(requests[0].code.clone())
        );
    }
}

async fn concurrent_completions_keep_one(store: &dyn DeletionStore, t: SystemTime) {
    let request = record(store, facebook(), "cc-1", t).await;
    let calls = (0..12u64).map(|i| {
        let outcome = if i % 2 == 0 {
            DeletionOutcome::IdentityRemoved
        } else {
            DeletionOutcome::NothingFound
        };
        store.complete(&request.code, outcome, t + Duration::from_secs(i))
    });
    let results: Vec<DeletionRequest> = join_all(calls.collect())
        .await
        .into_iter()
        .map(|r| {
            r.expect("a concurrent completion succeeds")
                .expect("the request is kept")
        })
        .collect();
    assert!(
        results.iter().all(|r| *r == results[0]),
        "every completion returns the first: {results:?}"
    );
    assert_eq!(results[0].status, DeletionStatus::Completed);
    assert_eq!(
        get(store, &request.code, t).await.as_ref(),
        Some(&results[0])
    );
}
