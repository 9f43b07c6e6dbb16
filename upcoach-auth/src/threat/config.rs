//! Threat detection's settings: [`ThreatConfig`], read from `THREAT_*`.

use std::time::Duration;

use upcoach_core::config::{Env, Settings};

use super::Detector;

/// The most a detector's count may be set to (its window keeps at most
/// [`MAX_WINDOW_MEMBERS`](super::MAX_WINDOW_MEMBERS) entries).
pub const MAX_THRESHOLD: u32 = 1000;

/// The longest window a detector may use.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// How many of something within how long raise an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    /// The count that raises the alert (it fires when the window holds this many);
    /// 0 turns the detector off.
    pub count: u32,
    /// The sliding window; also how long a raised alert stays open (no repeat for the
    /// same subject meanwhile).
    pub window: Duration,
}

impl Threshold {
    /// `count` within `window`.
    pub const fn new(count: u32, window: Duration) -> Self {
        Self { count, window }
    }

    /// Whether the detector is on.
    pub fn is_on(&self) -> bool {
        self.count > 0 && !self.window.is_zero()
    }
}

/// What threat detection reads from the environment.
///
/// | Variable | Default | Meaning |
/// |---|---|---|
/// | `THREAT_DETECTION_ENABLED` | `true` | `false` forwards events without examining them |
/// | `THREAT_BRUTE_FORCE_MAX` | `10` | failed sign-ins from one address (IPv4, or IPv6 /64) that raise `brute_force_address` |
/// | `THREAT_BRUTE_FORCE_WINDOW` | `5m` | … within this window |
/// | `THREAT_ACCOUNT_FAILURES_MAX` | `5` | failed sign-ins of one account that raise `brute_force_account` |
/// | `THREAT_ACCOUNT_FAILURES_WINDOW` | `15m` | … within this window |
/// | `THREAT_STUFFING_ACCOUNTS` | `5` | distinct accounts failing from one address that raise `credential_stuffing` |
/// | `THREAT_STUFFING_WINDOW` | `10m` | … within this window |
/// | `THREAT_TOKEN_REUSE_WINDOW` | `1h` | at most one `refresh_token_reuse` alert per user per window |
/// | `THREAT_SIGNIN_BURST_ADDRESSES` | `4` | distinct addresses one account signs in from that raise `signin_burst` |
/// | `THREAT_SIGNIN_BURST_WINDOW` | `10m` | … within this window |
/// | `THREAT_BLOCK_DURATION` | `15m` | how long brute force and stuffing block the address in the rate limiter; `0` blocks nothing |
/// | `THREAT_MAX_KEYS` | `100000` | subjects the in-memory state tracks at once |
/// | `THREAT_QUEUE_CAPACITY` | `4096` | events waiting for the detectors; past it they are not examined (still recorded) |
///
/// Counts are 0 (detector off) to 1000. Windows are a number of seconds (`300`) or a
/// number with a unit (`90s`, `5m`, `1h`), from 1 s to 24 h.
///
/// ```
/// use std::time::Duration;
/// use upcoach_auth::threat::ThreatConfig;
/// use upcoach_core::config::Settings;
///
/// let env = [("THREAT_BRUTE_FORCE_MAX", "20"), ("THREAT_BRUTE_FORCE_WINDOW", "10m")];
/// let config = ThreatConfig::from_lookup(|name| {
///     env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
/// })?;
/// assert_eq!(config.brute_force.count, 20);
/// assert_eq!(config.brute_force.window, Duration::from_secs(600));
/// assert_eq!(config.block, Duration::from_secs(900));
///
/// let err = ThreatConfig::from_lookup(|n| (n == "THREAT_STUFFING_WINDOW").then(|| "2d".into()))
///     .unwrap_err();
/// assert_eq!(err.variables().collect::<Vec<_>>(), ["THREAT_STUFFING_WINDOW"]);
/// # Ok::<(), upcoach_core::config::ConfigErrors>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ThreatConfig {
    /// `THREAT_DETECTION_ENABLED`: whether events are examined at all (default true).
    pub enabled: bool,
    /// `THREAT_BRUTE_FORCE_MAX` / `_WINDOW`: failures per address (default 10 in 5 min).
    pub brute_force: Threshold,
    /// `THREAT_ACCOUNT_FAILURES_MAX` / `_WINDOW`: failures per account (default 5 in
    /// 15 min).
    pub account_failures: Threshold,
    /// `THREAT_STUFFING_ACCOUNTS` / `_WINDOW`: distinct failing accounts per address
    /// (default 5 in 10 min).
    pub credential_stuffing: Threshold,
    /// `THREAT_TOKEN_REUSE_WINDOW`: refresh-token reuse, every one an alert (count 1),
    /// at most one per user per window (default 1 h).
    pub token_reuse: Threshold,
    /// `THREAT_SIGNIN_BURST_ADDRESSES` / `_WINDOW`: distinct addresses one account
    /// signs in from (default 4 in 10 min).
    pub signin_burst: Threshold,
    /// `THREAT_BLOCK_DURATION`: how long brute force by address and credential stuffing
    /// block the address ([`RateLimiter::block`](upcoach_core::limit::RateLimiter::block));
    /// zero blocks nothing (default 15 min).
    pub block: Duration,
    /// `THREAT_MAX_KEYS`: how many (detector, subject) windows the in-memory state
    /// keeps (default 100,000).
    pub max_keys: usize,
    /// `THREAT_QUEUE_CAPACITY`: events waiting for the detectors (default 4,096).
    pub queue_capacity: usize,
}

/// The default of `THREAT_QUEUE_CAPACITY`.
pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;
/// The default of `THREAT_MAX_KEYS`.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

impl Default for ThreatConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            brute_force: Threshold::new(10, Duration::from_secs(5 * 60)),
            account_failures: Threshold::new(5, Duration::from_secs(15 * 60)),
            credential_stuffing: Threshold::new(5, Duration::from_secs(10 * 60)),
            token_reuse: Threshold::new(1, Duration::from_secs(3600)),
            signin_burst: Threshold::new(4, Duration::from_secs(10 * 60)),
            block: Duration::from_secs(15 * 60),
            max_keys: DEFAULT_MAX_KEYS,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
        }
    }
}

impl ThreatConfig {
    /// The threshold of `detector`.
    pub fn threshold(&self, detector: Detector) -> Threshold {
        match detector {
            Detector::BruteForceAddress => self.brute_force,
            Detector::BruteForceAccount => self.account_failures,
            Detector::CredentialStuffing => self.credential_stuffing,
            Detector::RefreshTokenReuse => self.token_reuse,
            Detector::SigninBurst => self.signin_burst,
        }
    }
}

const COUNT_EXPECTED: &str = "a whole number from 0 (off) to 1000";
const WINDOW_EXPECTED: &str = "a duration from 1s to 24h such as 300, 90s, 5m or 1h";

/// Reads a window: whole seconds (`300`) or [`parse_window`]'s `90s`, `5m`, `1h`.
///
/// [`parse_window`]: upcoach_core::event::parse_window
fn window(env: &mut Env<'_>, variable: &'static str, default: Duration) -> Duration {
    let Some(value) = env.get(variable) else {
        return default;
    };
    let text = value.trim();
    let parsed = if text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<u64>().ok().map(Duration::from_secs)
    } else {
        upcoach_core::event::parse_window(text)
    };
    match parsed {
        Some(d) if d >= Duration::from_secs(1) && d <= MAX_WINDOW => d,
        _ => {
            env.invalid(variable, WINDOW_EXPECTED, Some(value.clone()));
            default
        }
    }
}

fn threshold(
    env: &mut Env<'_>,
    count: &'static str,
    window_variable: &'static str,
    default: Threshold,
) -> Threshold {
    Threshold {
        count: env.number(count, default.count, 0..=MAX_THRESHOLD, COUNT_EXPECTED),
        window: window(env, window_variable, default.window),
    }
}

impl Settings for ThreatConfig {
    fn read(env: &mut Env<'_>) -> Self {
        let d = Self::default();
        let enabled = env.flag("THREAT_DETECTION_ENABLED", d.enabled);
        let brute_force = threshold(
            env,
            "THREAT_BRUTE_FORCE_MAX",
            "THREAT_BRUTE_FORCE_WINDOW",
            d.brute_force,
        );
        let account_failures = threshold(
            env,
            "THREAT_ACCOUNT_FAILURES_MAX",
            "THREAT_ACCOUNT_FAILURES_WINDOW",
            d.account_failures,
        );
        let credential_stuffing = threshold(
            env,
            "THREAT_STUFFING_ACCOUNTS",
            "THREAT_STUFFING_WINDOW",
            d.credential_stuffing,
        );
        let token_reuse = Threshold {
            count: d.token_reuse.count,
            window: window(env, "THREAT_TOKEN_REUSE_WINDOW", d.token_reuse.window),
        };
        let signin_burst = threshold(
            env,
            "THREAT_SIGNIN_BURST_ADDRESSES",
            "THREAT_SIGNIN_BURST_WINDOW",
            d.signin_burst,
        );
        let block = match env.get("THREAT_BLOCK_DURATION") {
            Some(v) if v.trim() == "0" => Duration::ZERO,
            _ => window(env, "THREAT_BLOCK_DURATION", d.block),
        };
        let max_keys = env.number(
            "THREAT_MAX_KEYS",
            d.max_keys,
            1..=10_000_000,
            "a whole number from 1 to 10000000",
        );
        let queue_capacity = env.number(
            "THREAT_QUEUE_CAPACITY",
            d.queue_capacity,
            1..=1_000_000,
            "a whole number from 1 to 1000000",
        );
        Self {
            enabled,
            brute_force,
            account_failures,
            credential_stuffing,
            token_reuse,
            signin_burst,
            block,
            max_keys,
            queue_capacity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pairs: &[(&str, &str)]) -> Result<ThreatConfig, upcoach_core::config::ConfigErrors> {
        ThreatConfig::from_lookup(|name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn defaults_when_unset() {
        assert_eq!(read(&[]).unwrap(), ThreatConfig::default());
    }

    #[test]
    fn windows_take_seconds_or_units() {
        let c = read(&[
            ("THREAT_BRUTE_FORCE_WINDOW", "120"),
            ("THREAT_SIGNIN_BURST_WINDOW", "1h"),
            ("THREAT_BLOCK_DURATION", "0"),
            ("THREAT_STUFFING_ACCOUNTS", "0"),
        ])
        .unwrap();
        assert_eq!(c.brute_force.window, Duration::from_secs(120));
        assert_eq!(c.signin_burst.window, Duration::from_secs(3600));
        assert_eq!(c.block, Duration::ZERO);
        assert!(!c.credential_stuffing.is_on());
    }

    #[test]
    fn every_bad_value_is_reported() {
        let err = read(&[
            ("THREAT_BRUTE_FORCE_MAX", "1001"),
            ("THREAT_BRUTE_FORCE_WINDOW", "0"),
            ("THREAT_TOKEN_REUSE_WINDOW", "25h"),
            ("THREAT_BLOCK_DURATION", "soon"),
            ("THREAT_DETECTION_ENABLED", "maybe"),
        ])
        .unwrap_err();
        let mut names: Vec<_> = err.variables().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "THREAT_BLOCK_DURATION",
                "THREAT_BRUTE_FORCE_MAX",
                "THREAT_BRUTE_FORCE_WINDOW",
                "THREAT_DETECTION_ENABLED",
                "THREAT_TOKEN_REUSE_WINDOW",
            ]
        );
    }
}
