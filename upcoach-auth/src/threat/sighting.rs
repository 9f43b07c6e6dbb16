//! What the detectors read of a security event: [`account_of`], and the sighting the
//! task examines.

use std::time::SystemTime;

use upcoach_core::UserId;
use upcoach_core::event::SecurityEvent;
use upcoach_core::limit::ip_subject;

use super::{Detector, FAILURE_EVENTS, SUCCESS_EVENTS, TOKEN_REUSE_EVENTS};

/// The account an event is about, for the per-account detectors: `user:<uuid>` when it
/// names its user; else, from its details, `subject:<provider>:<subject>` (the
/// provider's subject, with `details.provider` when present) or `email:<address>`
/// (lowercased). A value longer than 128 bytes or holding braces, whitespace or
/// control characters becomes `subject:sha256:<hex>` / `email:sha256:<hex>`. `None`
/// when the event names no account (sign-in's `login_failed` today).
///
/// ```
/// use upcoach_auth::threat::account_of;
/// use upcoach_core::event::SecurityEvent;
/// use upcoach_core::SystemClock;
///
/// let failed = SecurityEvent::new("login_failed", &SystemClock)
///     .details(serde_json::json!({"provider": "google", "code": "invalid_token"}));
/// assert_eq!(account_of(&failed), None);
/// let failed = failed.details(serde_json::json!({"email": "Ada@Example.com"}));
/// assert_eq!(account_of(&failed).as_deref(), Some("email:ada@example.com"));
/// ```
pub fn account_of(event: &SecurityEvent) -> Option<String> {
    if let Some(user) = event.user_id {
        return Some(user_subject(user));
    }
    let text = |field: &str| {
        event
            .details
            .get(field)
            .and_then(|v| v.as_str())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    if let Some(subject) = text("subject") {
        let value = match text("provider") {
            Some(provider) => format!("{provider}:{subject}"),
            None => subject.to_owned(),
        };
        return Some(clean("subject", &value));
    }
    text("email").map(|email| clean("email", &email.to_lowercase()))
}

fn user_subject(user: UserId) -> String {
    format!("user:{user}")
}

/// `label:value`, or `label:sha256:<hex>` for a value unfit for keys and logs.
fn clean(label: &str, value: &str) -> String {
    let fit = value.len() <= 128
        && !value
            .chars()
            .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control());
    if fit {
        return format!("{label}:{value}");
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(value.as_bytes());
    let mut hex = String::with_capacity(32);
    for b in &digest[..16] {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("{label}:sha256:{hex}")
}

/// What a detector reads of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Failure,
    TokenReuse,
    Success,
}

/// The part of a security event the detectors read.
#[derive(Debug)]
pub(super) struct Sighting {
    pub(super) kind: Kind,
    pub(super) event_type: String,
    pub(super) id: String,
    pub(super) user: Option<UserId>,
    pub(super) address: Option<String>,
    pub(super) account: Option<String>,
    pub(super) at: SystemTime,
}

impl Sighting {
    pub(super) fn of(event: &SecurityEvent) -> Option<Self> {
        let name = event.event_type.as_str();
        let kind = if FAILURE_EVENTS.contains(&name) {
            Kind::Failure
        } else if TOKEN_REUSE_EVENTS.contains(&name) {
            Kind::TokenReuse
        } else if SUCCESS_EVENTS.contains(&name) {
            Kind::Success
        } else {
            return None;
        };
        // A summary row of an aggregating log stands for events already seen (the
        // detector goes outside it) or not seen one by one: never counted.
        if event.details.get("aggregated") == Some(&serde_json::Value::Bool(true)) {
            return None;
        }
        Some(Self {
            kind,
            event_type: event.event_type.clone(),
            id: event.id.to_string(),
            user: event.user_id,
            address: event.ip_address.map(ip_subject),
            account: account_of(event),
            at: event.created_at,
        })
    }

    /// (detector, subject, member) of each observation this event makes.
    pub(super) fn observations(&self) -> Vec<(Detector, &str, &str)> {
        let mut out = Vec::with_capacity(3);
        match self.kind {
            Kind::Failure => {
                if let Some(address) = &self.address {
                    out.push((
                        Detector::BruteForceAddress,
                        address.as_str(),
                        self.id.as_str(),
                    ));
                }
                if let Some(account) = &self.account {
                    out.push((
                        Detector::BruteForceAccount,
                        account.as_str(),
                        self.id.as_str(),
                    ));
                    if let Some(address) = &self.address {
                        out.push((Detector::CredentialStuffing, address.as_str(), account));
                    }
                }
            }
            Kind::TokenReuse => {
                if let Some(account) = &self.account {
                    out.push((
                        Detector::RefreshTokenReuse,
                        account.as_str(),
                        self.id.as_str(),
                    ));
                }
            }
            Kind::Success => {
                if let (Some(_), Some(account), Some(address)) =
                    (self.user, &self.account, &self.address)
                {
                    out.push((Detector::SigninBurst, account.as_str(), address.as_str()));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use upcoach_core::SystemClock;

    #[test]
    fn odd_account_values_are_hashed() {
        let event = SecurityEvent::new("login_failed", &SystemClock)
            .details(serde_json::json!({"subject": "a{b}"}));
        let account = account_of(&event).unwrap();
        assert!(account.starts_with("subject:sha256:"), "{account}");
        assert_eq!(account.len(), "subject:sha256:".len() + 32);
        let event = SecurityEvent::new("login_failed", &SystemClock)
            .details(serde_json::json!({"provider": "google", "subject": "1234"}));
        assert_eq!(account_of(&event).as_deref(), Some("subject:google:1234"));
    }
}
