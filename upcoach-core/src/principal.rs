//! Who is making a request: [`UserId`], [`Role`], [`SessionId`] and [`Principal`].

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::Clock;

/// The stable identifier of a user (a UUID, time-ordered when we create it).
///
/// A user is never identified by e-mail address: identities from providers are keyed by
/// (provider, subject) and point at a `UserId`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(Uuid);

impl UserId {
    /// A new, time-ordered (UUIDv7) user id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Wraps an existing UUID.
    pub const fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    /// The UUID inside.
    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for UserId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({})", self.0)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl FromStr for UserId {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| InvalidId { kind: "user id" })
    }
}

impl From<Uuid> for UserId {
    fn from(id: Uuid) -> Self {
        Self(id)
    }
}

/// The identifier of one sign-in session (one refresh-token family).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(Uuid);

impl SessionId {
    /// A new, random-enough, time-ordered session id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Wraps an existing UUID.
    pub const fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    /// The UUID inside.
    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for SessionId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.0)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl FromStr for SessionId {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| InvalidId { kind: "session id" })
    }
}

/// A string that should have been an identifier was not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid {kind}: expected a UUID such as 0192f0c1-7a3e-7cc0-9d5e-3f1c2b6a9e41")]
pub struct InvalidId {
    kind: &'static str,
}

/// A role granted to a user, such as `admin` or `coach`.
///
/// Roles are short lowercase names (`[a-z0-9_-]`, 1 to 32 characters), so they are safe
/// to put in tokens, logs and room names.
///
/// ```
/// use upcoach_core::Role;
///
/// let role: Role = "coach".parse()?;
/// assert_eq!(role, Role::COACH);
/// assert!("Coach!".parse::<Role>().is_err());
/// # Ok::<(), upcoach_core::principal::InvalidRole>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Role(Cow<'static, str>);

impl Role {
    /// Administrators: every room and every operator route.
    pub const ADMIN: Role = Role(Cow::Borrowed("admin"));
    /// Coaches: their own `coach:{id}` room.
    pub const COACH: Role = Role(Cow::Borrowed("coach"));
    /// Signed-in users: their own `user:{id}` room and `public:*` rooms.
    pub const USER: Role = Role(Cow::Borrowed("user"));

    /// The role's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Role({})", self.0)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Role {
    type Err = InvalidRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let valid = (1..=32).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid {
            return Err(InvalidRole);
        }
        Ok(match s {
            "admin" => Role::ADMIN,
            "coach" => Role::COACH,
            "user" => Role::USER,
            other => Role(Cow::Owned(other.to_owned())),
        })
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A role name was not `[a-z0-9_-]{1,32}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid role: expected 1 to 32 characters of a-z, 0-9, '_' or '-'")]
pub struct InvalidRole;

/// A verified caller: who they are, what they may do, which session they belong to and
/// until when this proof is good.
///
/// A `Principal` comes out of a [`TokenVerifier`](crate::TokenVerifier); every expiry
/// decision takes its time from a [`Clock`].
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use upcoach_core::{Clock, ManualClock, Principal, Role, SessionId, UserId};
///
/// let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
/// let principal = Principal::new(
///     UserId::new(),
///     vec![Role::COACH],
///     SessionId::new(),
///     clock.now() + Duration::from_secs(900),
/// );
/// assert!(principal.has_role(&Role::COACH));
/// assert!(!principal.is_admin());
/// assert!(!principal.is_expired(&clock));
/// clock.advance(Duration::from_secs(901));
/// assert!(principal.is_expired(&clock));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// The user.
    pub user_id: UserId,
    /// The roles granted to the user for this session.
    pub roles: Vec<Role>,
    /// The sign-in session this proof belongs to.
    pub session_id: SessionId,
    /// The instant after which this proof must no longer be accepted.
    pub expires_at: SystemTime,
}

impl Principal {
    /// A principal with the given user, roles, session and expiry.
    pub fn new(
        user_id: UserId,
        roles: Vec<Role>,
        session_id: SessionId,
        expires_at: SystemTime,
    ) -> Self {
        Self {
            user_id,
            roles,
            session_id,
            expires_at,
        }
    }

    /// Whether the principal holds `role`.
    pub fn has_role(&self, role: &Role) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Whether the principal holds the `admin` role.
    pub fn is_admin(&self) -> bool {
        self.has_role(&Role::ADMIN)
    }

    /// Whether the proof has expired by `clock`'s time (expired at exactly `expires_at`).
    pub fn is_expired(&self, clock: &dyn Clock) -> bool {
        clock.now() >= self.expires_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_round_trips_through_text() {
        let id = UserId::new();
        assert_eq!(id.to_string().parse::<UserId>().unwrap(), id);
        assert!("42".parse::<UserId>().is_err());
        assert!("".parse::<UserId>().is_err());
    }

    #[test]
    fn roles_are_validated() {
        for bad in [
            "",
            "Admin",
            "a b",
            "x".repeat(33).as_str(),
            "rôle",
            "admin\n",
        ] {
            assert!(bad.parse::<Role>().is_err(), "{bad:?} should be refused");
        }
        assert_eq!("admin".parse::<Role>().unwrap(), Role::ADMIN);
        assert_eq!(
            "team-lead_2".parse::<Role>().unwrap().as_str(),
            "team-lead_2"
        );
        assert!(serde_json::from_str::<Role>("\"ADMIN\"").is_err());
        assert_eq!(
            serde_json::from_str::<Role>("\"coach\"").unwrap(),
            Role::COACH
        );
    }
}
