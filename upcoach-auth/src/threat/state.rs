//! Where the detectors keep their sliding windows and open alerts: the
//! [`DetectorState`] seam and [`MemoryDetectorState`].

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

/// The most entries one window keeps: past it the oldest goes, so a count saturates
/// here (a flood of 10,000 failures reads as 1,024).
pub const MAX_WINDOW_MEMBERS: usize = 1024;

/// How often, at most, the in-memory state sweeps idle windows when it is full.
const SWEEP_EVERY_MS: u64 = 1000;

/// One thing a detector saw: `member` in the window of (`detector`, `subject`) at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation<'a> {
    /// The detector (`brute_force_address`).
    pub detector: &'a str,
    /// Whom it is about (`ip:203.0.113.7`, `user:<uuid>`).
    pub subject: &'a str,
    /// What is counted: an event id to count events, or an account or address to count
    /// distinct ones (a member seen again only moves to `at`).
    pub member: &'a str,
    /// When it happened (the event's `created_at`): windows run on event time.
    pub at: SystemTime,
    /// The sliding window: members at or before `at - window` no longer count.
    pub window: Duration,
    /// The count that opens an alert; 0 never opens one.
    pub threshold: u32,
    /// How long an opened alert stays open (no other opens for the same detector and
    /// subject until `at + hold`).
    pub hold: Duration,
}

impl<'a> Observation<'a> {
    /// `member` of (`detector`, `subject`) at `at`, counted over `window` against
    /// `threshold`; an alert it opens stays open for one window.
    pub fn new(
        detector: &'a str,
        subject: &'a str,
        member: &'a str,
        at: SystemTime,
        window: Duration,
        threshold: u32,
    ) -> Self {
        Self {
            detector,
            subject,
            member,
            at,
            window,
            threshold,
            hold: window,
        }
    }

    /// The same observation with an alert held open for `hold`.
    pub fn hold(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }

    /// `at` in milliseconds since the Unix epoch.
    pub fn at_millis(&self) -> u64 {
        millis_since_epoch(self.at)
    }
}

/// What an observation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    /// Distinct members in the window, the new one included (at most
    /// [`MAX_WINDOW_MEMBERS`]).
    pub count: u64,
    /// Whether this observation opened an alert: the count reached the threshold and no
    /// alert was open for (detector, subject). Of observations racing on one state, at
    /// most one opens it.
    pub opened: bool,
}

/// Why the state could not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The backing store (Redis) failed.
    #[error("the {backend} detector state failed")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// Its error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StateError {
    /// Whether trying again later could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StateError::Backend { .. })
    }
}

/// The detectors' memory: sliding windows of distinct members, and open alerts.
///
/// One call does everything for one observation, atomically: add the member, forget
/// what left the window, count, and open the alert when the count reaches the
/// threshold and none is open. Shared state (Redis) makes several processes one
/// detector: a pattern split across them is counted once and alerted once.
///
/// Implementing your own (this one keeps nothing and never alerts):
///
/// ```
/// use async_trait::async_trait;
/// use upcoach_auth::threat::{DetectorState, Observation, StateError, Tally};
///
/// #[derive(Debug)]
/// struct Forgetful;
///
/// #[async_trait]
/// impl DetectorState for Forgetful {
///     async fn observe(&self, _: &Observation<'_>) -> Result<Tally, StateError> {
///         Ok(Tally { count: 1, opened: false })
///     }
/// }
/// ```
#[async_trait]
pub trait DetectorState: fmt::Debug + Send + Sync + 'static {
    /// Adds `observation.member` at `observation.at` to the window of (detector,
    /// subject), drops members at or before `at - window`, keeps at most
    /// [`MAX_WINDOW_MEMBERS`] (the oldest go), and counts. When the count reaches a
    /// non-zero threshold and no alert of (detector, subject) is open at `at`, opens
    /// one until `at + hold` and says so.
    async fn observe(&self, observation: &Observation<'_>) -> Result<Tally, StateError>;

    /// Observations not tracked because the state was full (0 for a state without a
    /// bound).
    fn untracked(&self) -> u64 {
        0
    }
}

pub(crate) fn millis_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The detectors' state in this process only: a bounded map of windows.
///
/// - At most `max_keys` (detector, subject) windows (default 100,000). When full, windows
///   idle for longer than their window are swept (at most once a second of event time);
///   if it is still full, an observation of a new subject is not tracked and is counted
///   in [`untracked`](DetectorState::untracked). Subjects already tracked keep being
///   counted, so a flood of new addresses cannot push out the ones being watched.
/// - At most [`MAX_WINDOW_MEMBERS`] members per window.
/// - Time is the observation's `at` (the event's `created_at`), as in Redis.
///
/// Several processes each with their own memory state each see only their share of a
/// pattern: use `RedisDetectorState` (feature `redis`) across processes.
#[derive(Debug)]
pub struct MemoryDetectorState {
    max_keys: usize,
    windows: Mutex<Windows>,
    untracked: AtomicU64,
}

#[derive(Debug, Default)]
struct Windows {
    map: HashMap<(String, String), Window>,
    last_sweep_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct Window {
    /// Member → when last seen (ms).
    members: HashMap<String, u64>,
    window_ms: u64,
    newest_ms: u64,
    open_until_ms: u64,
}

impl Default for MemoryDetectorState {
    fn default() -> Self {
        Self::new(super::config::DEFAULT_MAX_KEYS)
    }
}

impl MemoryDetectorState {
    /// A state tracking at most `max_keys` (detector, subject) windows (at least 1).
    pub fn new(max_keys: usize) -> Self {
        Self {
            max_keys: max_keys.max(1),
            windows: Mutex::new(Windows::default()),
            untracked: AtomicU64::new(0),
        }
    }

    /// How many windows are held now.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether no window is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Windows> {
        // No code path panics while holding it; recover the map if one ever did.
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn observe_now(&self, o: &Observation<'_>) -> Tally {
        let now = o.at_millis();
        let window_ms = millis(o.window);
        let mut windows = self.lock();
        let key = (o.detector.to_owned(), o.subject.to_owned());
        if !windows.map.contains_key(&key) && windows.map.len() >= self.max_keys {
            let due = windows
                .last_sweep_ms
                .is_none_or(|last| now.abs_diff(last) >= SWEEP_EVERY_MS);
            if due {
                windows.last_sweep_ms = Some(now);
                windows.map.retain(|_, w| {
                    w.newest_ms.saturating_add(w.window_ms) > now || w.open_until_ms > now
                });
            }
            if windows.map.len() >= self.max_keys {
                self.untracked.fetch_add(1, Ordering::Relaxed);
                return Tally::default();
            }
        }
        let w = windows.map.entry(key).or_default();
        w.window_ms = window_ms;
        w.newest_ms = w.newest_ms.max(now);
        let seen = w.members.entry(o.member.to_owned()).or_insert(now);
        *seen = (*seen).max(now);
        let cutoff = now.saturating_sub(window_ms);
        w.members.retain(|_, t| *t > cutoff);
        while w.members.len() > MAX_WINDOW_MEMBERS {
            let Some(oldest) = w
                .members
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(m, _)| m.clone())
            else {
                break;
            };
            w.members.remove(&oldest);
        }
        let count = w.members.len() as u64;
        let opened = o.threshold > 0 && count >= u64::from(o.threshold) && w.open_until_ms <= now;
        if opened {
            w.open_until_ms = now.saturating_add(millis(o.hold));
        }
        Tally { count, opened }
    }
}

#[async_trait]
impl DetectorState for MemoryDetectorState {
    async fn observe(&self, observation: &Observation<'_>) -> Result<Tally, StateError> {
        Ok(self.observe_now(observation))
    }

    fn untracked(&self) -> u64 {
        self.untracked.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    #[test]
    fn a_full_state_sweeps_idle_windows_then_stops_tracking_new_subjects() {
        let state = MemoryDetectorState::new(2);
        let o = |subject: &'static str, s| Observation::new("d", subject, "m", at(s), WINDOW, 5);
        state.observe_now(&o("a", 0));
        state.observe_now(&o("b", 0));
        assert_eq!(state.observe_now(&o("c", 1)).count, 0, "full: not tracked");
        assert_eq!(state.untracked.load(Ordering::Relaxed), 1);
        assert_eq!(
            state.observe_now(&o("a", 2)).count,
            1,
            "a known subject still counts"
        );
        // After the window, idle windows go and room is made.
        assert_eq!(state.observe_now(&o("c", 61)).count, 1);
        assert_eq!(state.len(), 2, "b went; a (seen at 2 s) stays");
    }

    #[test]
    fn a_window_keeps_at_most_the_cap_newest_first() {
        let state = MemoryDetectorState::new(10);
        for i in 0..(MAX_WINDOW_MEMBERS + 10) {
            let member = i.to_string();
            let t = state.observe_now(&Observation::new("d", "s", &member, at(0), WINDOW, 0));
            assert!(t.count as usize <= MAX_WINDOW_MEMBERS);
        }
        let t = state.observe_now(&Observation::new("d", "s", "new", at(1), WINDOW, 0));
        assert_eq!(t.count as usize, MAX_WINDOW_MEMBERS);
    }
}
