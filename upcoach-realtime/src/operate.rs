//! The producers' and operators' routes of API.md as handlers: publish an event over
//! HTTP, and the hub's status. Both need the `admin` role, which they check on the
//! [`Principal`] the host authenticated.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use upcoach_core::Principal;
use upcoach_core::http::{AccessError, json_response, read_json};

use crate::hub::{Hub, RealtimeBody};
use crate::respond::http_error;

/// The largest body [`Hub::publish_route`] reads: an event's largest payload and room
/// for its name.
pub const PUBLISH_BODY_LIMIT: usize = crate::MAX_EVENT_DATA_LEN + 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    event: String,
    #[serde(default)]
    data: serde_json::Value,
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<RealtimeBody> {
    json_response::<Full<Bytes>, T>(status, value).map(|b| {
        b.map_err(|never: std::convert::Infallible| match never {})
            .boxed()
    })
}

/// A refusal unless `principal` is an admin.
fn refuse_unless_admin(principal: &Principal) -> Option<Response<RealtimeBody>> {
    (!principal.is_admin()).then(|| http_error(&AccessError::MissingRole("admin")))
}

impl Hub {
    /// `POST /api/dashboard/realtime/broadcast/{room}` `{"event","data"}` for an admin:
    /// 202 `{"room","seq"}`. `room` is the path segment, percent-decoded by the router.
    /// The body must be `application/json` (415 otherwise), at most
    /// [`PUBLISH_BODY_LIMIT`] bytes (413).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::{Duration, SystemTime};
    /// use upcoach_core::{Principal, Role, SessionId, TokenError, TokenVerifier, UserId};
    /// use upcoach_realtime::{Hub, MemoryBroadcaster};
    ///
    /// #[derive(Debug)]
    /// struct Nobody;
    /// #[async_trait::async_trait]
    /// impl TokenVerifier for Nobody {
    ///     async fn verify(&self, _: &str) -> Result<Principal, TokenError> { Err(TokenError::Missing) }
    /// }
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let hub = Hub::builder(Arc::new(MemoryBroadcaster::default()), Arc::new(Nobody)).build();
    /// let admin = Principal::new(UserId::new(), vec![Role::ADMIN], SessionId::new(),
    ///     SystemTime::now() + Duration::from_secs(60));
    /// let request = http::Request::post("/")
    ///     .header("content-type", "application/json")
    ///     .body(http_body_util::Full::new(bytes::Bytes::from(r#"{"event":"news","data":{"n":1}}"#)))
    ///     .unwrap();
    /// let answer = hub.publish_route(&admin, "public:news", request).await;
    /// assert_eq!(answer.status(), 202);
    /// # });
    /// ```
    pub async fn publish_route<B>(
        &self,
        principal: &Principal,
        room: &str,
        request: Request<B>,
    ) -> Response<RealtimeBody>
    where
        B: http_body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Some(refused) = refuse_unless_admin(principal) {
            return refused;
        }
        let body: PublishBody = match read_json(request, PUBLISH_BODY_LIMIT).await {
            Ok(body) => body,
            Err(e) => return http_error(&e),
        };
        match self.publish(room, &body.event, body.data).await {
            Ok(event) => json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "room": event.room, "seq": event.seq }),
            ),
            Err(e) => {
                if e.is_retryable() {
                    tracing::warn!(error = %e, room, "a broadcast failed");
                }
                http_error(&e)
            }
        }
    }

    /// `GET /api/dashboard/realtime/status` for an admin: [`Hub::status`] as JSON.
    pub fn status_route(&self, principal: &Principal) -> Response<RealtimeBody> {
        refuse_unless_admin(principal).unwrap_or_else(|| json(StatusCode::OK, &self.status()))
    }
}

impl Hub {
    /// Publishes every value `rx` receives to `room` as `event`, until the sender is
    /// gone (a host forwards its alert transitions to `alerts` this way). Values lost
    /// to the channel's bound are logged with how many.
    pub fn spawn_forward<T>(
        &self,
        mut rx: tokio::sync::broadcast::Receiver<T>,
        room: &'static str,
        event: &'static str,
    ) -> tokio::task::JoinHandle<()>
    where
        T: serde::Serialize + Clone + Send + 'static,
    {
        use tokio::sync::broadcast::error::RecvError;
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(value) => {
                        let data = serde_json::to_value(&value).unwrap_or_default();
                        if let Err(e) = hub.publish(room, event, data).await {
                            tracing::warn!(error = %e, room, "a forwarded event was not published");
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(
                            missed,
                            room,
                            "events were not forwarded: the channel lagged"
                        );
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        })
    }

    /// Publishes `make()` to `room` as `event` every `every` (at least 1 ms), while
    /// `make` answers `Some` (a host's metrics snapshot, say, holding its state weakly).
    pub fn spawn_every(
        &self,
        every: std::time::Duration,
        room: &'static str,
        event: &'static str,
        make: impl Fn() -> Option<serde_json::Value> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every.max(std::time::Duration::from_millis(1)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(data) = make() else { return };
                if let Err(e) = hub.publish(room, event, data).await {
                    tracing::debug!(error = %e, room, "a periodic event was not published");
                }
            }
        })
    }
}
