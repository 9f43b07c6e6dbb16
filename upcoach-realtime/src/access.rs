//! Who may read which room.

use std::fmt;

use upcoach_core::{Principal, Role, UserId};

/// Decides whether a signed-in principal may subscribe to a room. Hosts replace
/// [`DefaultRoomAccess`] with their own rules through
/// [`HubBuilder::access`](crate::HubBuilder::access).
///
/// ```
/// use upcoach_core::Principal;
/// use upcoach_realtime::{DefaultRoomAccess, RoomAccess};
///
/// /// The default rules, plus `team:{name}` rooms open to every signed-in user.
/// #[derive(Debug)]
/// struct WithTeams;
///
/// impl RoomAccess for WithTeams {
///     fn can_subscribe(&self, principal: &Principal, room: &str) -> bool {
///         room.starts_with("team:") || DefaultRoomAccess.can_subscribe(principal, room)
///     }
/// }
/// ```
pub trait RoomAccess: fmt::Debug + Send + Sync + 'static {
    /// Whether `principal` may receive the events of `room` (already a valid room name).
    fn can_subscribe(&self, principal: &Principal, room: &str) -> bool;
}

/// The rules of the reference server's API: `metrics`, `alerts` and `security` need
/// `admin`; `coach:{user_id}` needs that user with the `coach` role, or an admin;
/// `user:{user_id}` needs that user or an admin; `public:{anything}` needs any
/// signed-in user. Every other room is refused.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use upcoach_core::{Principal, Role, SessionId, UserId};
/// use upcoach_realtime::{DefaultRoomAccess, RoomAccess};
///
/// let me = UserId::new();
/// let p = Principal::new(me, vec![Role::USER], SessionId::new(), SystemTime::now() + Duration::from_secs(60));
/// assert!(DefaultRoomAccess.can_subscribe(&p, &format!("user:{me}")));
/// assert!(DefaultRoomAccess.can_subscribe(&p, "public:news"));
/// assert!(!DefaultRoomAccess.can_subscribe(&p, "metrics"));
/// assert!(!DefaultRoomAccess.can_subscribe(&p, &format!("user:{}", UserId::new())));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultRoomAccess;

impl RoomAccess for DefaultRoomAccess {
    fn can_subscribe(&self, principal: &Principal, room: &str) -> bool {
        if principal.is_admin() {
            return matches!(room, "metrics" | "alerts" | "security")
                || ["coach:", "user:", "public:"].iter().any(|prefix| {
                    room.strip_prefix(prefix)
                        .is_some_and(|rest| !rest.is_empty())
                });
        }
        if let Some(id) = room.strip_prefix("user:") {
            return is_user(principal, id);
        }
        if let Some(id) = room.strip_prefix("coach:") {
            return principal.has_role(&Role::COACH) && is_user(principal, id);
        }
        if let Some(rest) = room.strip_prefix("public:") {
            return !rest.is_empty();
        }
        false
    }
}

fn is_user(principal: &Principal, id: &str) -> bool {
    id.parse::<UserId>().is_ok_and(|id| id == principal.user_id)
}
