//! Where alerts go live: [`AlertPublisher`], [`AlertPublisherFn`] and the payload
//! [`alert_payload`] makes.

use std::fmt;
use std::future::Future;
use std::time::SystemTime;

use async_trait::async_trait;
use upcoach_core::event::{AlertLevel, SystemAlert};

/// Where raised alerts go live: a host wires it to its realtime hub, publishing
/// [`alert_payload`] as [`ALERT_EVENT`](super::ALERT_EVENT) to each of
/// [`ALERT_ROOMS`](super::ALERT_ROOMS) (upcoach-auth does not depend on the hub).
/// [`AlertPublisherFn`] makes one of a closure.
///
/// Called from the detector's task, after the alert is recorded; one that takes longer
/// than 5 s is abandoned.
///
/// ```
/// use async_trait::async_trait;
/// use upcoach_auth::threat::AlertPublisher;
/// use upcoach_core::event::SystemAlert;
///
/// /// Logs alerts instead of publishing them.
/// #[derive(Debug)]
/// struct LogAlerts;
///
/// #[async_trait]
/// impl AlertPublisher for LogAlerts {
///     async fn publish(&self, alert: &SystemAlert) {
///         tracing::warn!(message = %alert.message, "security alert");
///     }
/// }
/// ```
#[async_trait]
pub trait AlertPublisher: fmt::Debug + Send + Sync + 'static {
    /// Publishes `alert`; failures are the publisher's to log.
    async fn publish(&self, alert: &SystemAlert);
}

/// An [`AlertPublisher`] made of a closure taking the alert by value.
///
/// ```
/// use std::sync::Arc;
/// use upcoach_auth::threat::{AlertPublisher, AlertPublisherFn, alert_payload};
///
/// let publisher: Arc<dyn AlertPublisher> = Arc::new(AlertPublisherFn::new(|alert| async move {
///     // hub.publish(room, ALERT_EVENT, alert_payload(&alert)).await for each room
///     let _ = alert_payload(&alert);
/// }));
/// ```
pub struct AlertPublisherFn<F>(F);

impl<F> AlertPublisherFn<F> {
    /// A publisher calling `f` with each alert.
    pub fn new(f: F) -> Self {
        Self(f)
    }
}

impl<F> fmt::Debug for AlertPublisherFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AlertPublisherFn")
    }
}

#[async_trait]
impl<F, Fut> AlertPublisher for AlertPublisherFn<F>
where
    F: Fn(SystemAlert) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    async fn publish(&self, alert: &SystemAlert) {
        (self.0)(alert.clone()).await
    }
}

/// An [`AlertPublisher`] that sends each alert's [`alert_payload`] as
/// [`ALERT_EVENT`](super::ALERT_EVENT) to every room of
/// [`ALERT_ROOMS`](super::ALERT_ROOMS) through `publish` (a realtime hub's or
/// broadcaster's publish, which this crate does not depend on), logging a room that
/// fails.
///
/// ```
/// use upcoach_auth::threat::room_publisher;
///
/// let publisher = room_publisher(|room, event, data| async move {
///     println!("{event} to {room}: {data}"); // hub.publish(room, event, data).await
///     Ok::<_, std::convert::Infallible>(())
/// });
/// ```
pub fn room_publisher<F, Fut, T, E>(publish: F) -> std::sync::Arc<dyn AlertPublisher>
where
    F: Fn(&'static str, &'static str, serde_json::Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    E: fmt::Display,
{
    let publish = std::sync::Arc::new(publish);
    std::sync::Arc::new(AlertPublisherFn::new(move |alert: SystemAlert| {
        let publish = publish.clone();
        async move {
            let data = alert_payload(&alert);
            for room in super::ALERT_ROOMS {
                if let Err(e) = publish(room, super::ALERT_EVENT, data.clone()).await {
                    tracing::warn!(error = %e, room, "a threat alert was not published");
                }
            }
        }
    }))
}

/// The realtime payload of an alert, in the shape of the perf alerts on the `alerts`
/// room (`rule`, `state`, `value`, `threshold`, `level`, `at` in ms), plus `id`,
/// `source`, `message`, and the alert's metadata (`detector`, `subject`, `window_s`,
/// ...).
///
/// ```
/// use upcoach_auth::threat::alert_payload;
/// use upcoach_core::event::{AlertLevel, SystemAlert};
/// use upcoach_core::SystemClock;
///
/// let alert = SystemAlert::new(AlertLevel::Warning, "auth", "10 failed sign-ins", &SystemClock)
///     .metadata(serde_json::json!({"detector": "brute_force_address", "subject": "ip:203.0.113.7",
///         "count": 10, "threshold": 10, "window_s": 300}));
/// let data = alert_payload(&alert);
/// assert_eq!(data["rule"], "brute_force_address");
/// assert_eq!(data["state"], "firing");
/// assert_eq!(data["value"], 10);
/// assert_eq!(data["level"], "warning");
/// assert_eq!(data["subject"], "ip:203.0.113.7");
/// ```
pub fn alert_payload(alert: &SystemAlert) -> serde_json::Value {
    let mut data = match &alert.metadata {
        serde_json::Value::Object(map) => map.clone(),
        _ => serde_json::Map::new(),
    };
    let rule = data
        .get("detector")
        .and_then(|d| d.as_str())
        .unwrap_or(&alert.source)
        .to_owned();
    let value = data
        .get("count")
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    let threshold = data
        .get("threshold")
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    let at = alert
        .created_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    for (k, v) in [
        ("rule", rule.into()),
        (
            "state",
            if alert.level == AlertLevel::Info {
                "resolved"
            } else {
                "firing"
            }
            .into(),
        ),
        ("value", value),
        ("threshold", threshold),
        ("level", alert.level.as_str().into()),
        ("at", at.into()),
        ("id", alert.id.clone().into()),
        ("source", alert.source.clone().into()),
        ("message", alert.message.clone().into()),
    ] {
        data.insert(k.to_owned(), v);
    }
    serde_json::Value::Object(data)
}
