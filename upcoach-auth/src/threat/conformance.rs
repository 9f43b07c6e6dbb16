//! The [`DetectorState`] conformance suite (feature `testing`): every backend's tests
//! call [`detector_state_conformance`], and a host's own backend can too.

use std::time::{Duration, SystemTime};

use super::state::{DetectorState, MAX_WINDOW_MEMBERS, Observation, Tally};

const WINDOW: Duration = Duration::from_secs(60);

/// Runs every check against `state`. Subjects are random, so a shared Redis is fine;
/// times are the checks' own (an hour from now onwards), so no clock is needed.
pub async fn detector_state_conformance(state: &dyn DetectorState) {
    counts_within_the_window_and_opens_once(state).await;
    distinct_members_count_once(state).await;
    detectors_and_subjects_are_separate(state).await;
    threshold_zero_never_opens(state).await;
    a_window_keeps_at_most_the_cap(state).await;
}

fn subject() -> String {
    format!("ip:conformance-{}", uuid::Uuid::new_v4().simple())
}

fn at(start: SystemTime, seconds: u64) -> SystemTime {
    start + Duration::from_secs(seconds)
}

fn start() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

async fn observe(
    state: &dyn DetectorState,
    detector: &str,
    subject: &str,
    member: &str,
    when: SystemTime,
    threshold: u32,
) -> Tally {
    state
        .observe(&Observation::new(
            detector, subject, member, when, WINDOW, threshold,
        ))
        .await
        .expect("the state answers")
}

async fn counts_within_the_window_and_opens_once(state: &dyn DetectorState) {
    let (s, t0) = (subject(), start());
    let d = "conformance_count";
    assert_eq!(
        observe(state, d, &s, "e1", at(t0, 0), 3).await,
        Tally {
            count: 1,
            opened: false
        }
    );
    assert_eq!(
        observe(state, d, &s, "e2", at(t0, 1), 3).await,
        Tally {
            count: 2,
            opened: false
        }
    );
    assert_eq!(
        observe(state, d, &s, "e3", at(t0, 2), 3).await,
        Tally {
            count: 3,
            opened: true
        },
        "the threshold opens the alert"
    );
    assert_eq!(
        observe(state, d, &s, "e4", at(t0, 10), 3).await,
        Tally {
            count: 4,
            opened: false
        },
        "an open alert is not opened again"
    );
    // At t0 + 61 s the window is (t0 + 1 s, t0 + 61 s]: e3, e4 and e5.
    let t = observe(state, d, &s, "e5", at(t0, 61), 3).await;
    assert_eq!(
        t,
        Tally {
            count: 3,
            opened: false
        },
        "e1 and e2 left the window; the alert is open until t0 + 62 s"
    );
    let t = observe(state, d, &s, "e6", at(t0, 62), 3).await;
    assert_eq!(
        t,
        Tally {
            count: 3,
            opened: true
        },
        "e3 left; the hold ended at t0 + 62 s and the pattern still holds: opened again"
    );
    let t = observe(state, d, &s, "e7", at(t0, 300), 3).await;
    assert_eq!(
        t,
        Tally {
            count: 1,
            opened: false
        },
        "a quiet window starts over"
    );
}

async fn distinct_members_count_once(state: &dyn DetectorState) {
    let (s, t0) = (subject(), start());
    let d = "conformance_distinct";
    for i in 0..5 {
        let t = observe(state, d, &s, "user:a", at(t0, i), 2).await;
        assert_eq!(t.count, 1, "one member however often it is seen");
        assert!(!t.opened);
    }
    // Seen again at t0 + 4 s, user:a is still in the window at t0 + 63 s.
    let t = observe(state, d, &s, "user:b", at(t0, 63), 2).await;
    assert_eq!(
        t,
        Tally {
            count: 2,
            opened: true
        },
        "a member seen again moves to its latest time"
    );
}

async fn detectors_and_subjects_are_separate(state: &dyn DetectorState) {
    let (a, b, t0) = (subject(), subject(), start());
    for i in 0..3 {
        observe(state, "conformance_one", &a, &format!("e{i}"), at(t0, i), 0).await;
    }
    assert_eq!(
        observe(state, "conformance_one", &b, "e0", at(t0, 3), 0)
            .await
            .count,
        1,
        "another subject"
    );
    assert_eq!(
        observe(state, "conformance_two", &a, "e0", at(t0, 3), 0)
            .await
            .count,
        1,
        "another detector"
    );
    // A subject with braces, as a host might pass one.
    let odd = format!("{a}{{x}}");
    assert_eq!(
        observe(state, "conformance_one", &odd, "e0", at(t0, 3), 0)
            .await
            .count,
        1
    );
}

async fn threshold_zero_never_opens(state: &dyn DetectorState) {
    let (s, t0) = (subject(), start());
    for i in 0..5 {
        let t = observe(state, "conformance_off", &s, &format!("e{i}"), at(t0, i), 0).await;
        assert!(!t.opened, "threshold 0 is off");
    }
}

async fn a_window_keeps_at_most_the_cap(state: &dyn DetectorState) {
    let (s, t0) = (subject(), start());
    let mut last = Tally::default();
    for i in 0..(MAX_WINDOW_MEMBERS + 20) {
        let when = t0 + Duration::from_millis(i as u64);
        last = observe(state, "conformance_cap", &s, &format!("e{i}"), when, 0).await;
        assert!(last.count as usize <= MAX_WINDOW_MEMBERS);
    }
    assert_eq!(
        last.count as usize, MAX_WINDOW_MEMBERS,
        "the count saturates"
    );
}
