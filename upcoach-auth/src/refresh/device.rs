//! Device binding: a [`DeviceId`] the client presents, and the [`DeviceFingerprint`] a
//! refresh family is bound to.
//!
//! **The fingerprint** is `SHA-256("upcoach-device-v1" ‖ 0x00 ‖ device id)`: 32 bytes,
//! the only thing stored (Postgres `refresh_families.device_fingerprint`), so neither a
//! database dump nor a log ever holds a raw device id. The device id is the one request
//! trait in it, on purpose:
//!
//! - the **platform** (`web`, `ios`, `android`) is stable, but a refresh
//!   (`POST /auth/refresh {"refresh_token"}`) does not carry it, so it could not be
//!   recomputed there; kept beside the fingerprint it would only be compared with itself;
//! - the **User-Agent** changes with every browser and app update, and even its product
//!   token changes when an app switches HTTP library, while anyone can copy it: since a
//!   mismatch revokes the family, it would log users out and stop no one;
//! - the **IP address** changes whenever a phone changes network.
//!
//! A client-chosen device id should be random (a UUID the app keeps in its keychain or
//! preferences, say): the hash is unkeyed, which hides a random id but not a guessable
//! one such as a serial number. A browser's is always random: the server makes it
//! ([`DeviceId::generate`]) and keeps it in the browser as an `HttpOnly` cookie (with
//! the `http` feature, `upcoach_auth::http::DEVICE_COOKIE`), which is checked like the
//! header but ignored, not refused, when it is not a valid id.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use super::RefreshError;

/// The header native clients (and web apps that keep their device id themselves) send
/// their device id in.
pub const DEVICE_ID_HEADER: &str = "x-device-id";
/// The shortest device id accepted.
pub const MIN_DEVICE_ID_LEN: usize = 8;
/// The longest device id accepted.
pub const MAX_DEVICE_ID_LEN: usize = 128;

/// The domain separation of the fingerprint's hash (`v1`: the device id only).
const FINGERPRINT_DOMAIN: &[u8] = b"upcoach-device-v1\0";

/// A device id as a client presents it: 8 to 128 characters of `A-Z a-z 0-9 . _ : -`.
///
/// `Debug` and `Display` print `[redacted]`: it is half of what binds a refresh family,
/// so it stays out of logs and security events like the token does.
///
/// ```
/// use upcoach_auth::refresh::{DeviceFingerprint, DeviceId};
///
/// let device: DeviceId = "6F9619FF-8B86-D011-B42D-00CF4FC964FF".parse()?;
/// assert_eq!(format!("{device:?}"), "DeviceId([redacted])");
/// assert_eq!(device.fingerprint(), DeviceFingerprint::of(&device));
/// assert!("short".parse::<DeviceId>().is_err());
/// assert!("has space in it".parse::<DeviceId>().is_err());
/// # Ok::<(), upcoach_auth::refresh::InvalidDeviceId>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceId(String);

impl DeviceId {
    /// `presented` if it is 8 to 128 characters of `A-Z a-z 0-9 . _ : -`.
    pub fn parse(presented: &str) -> Result<Self, InvalidDeviceId> {
        let ok = (MIN_DEVICE_ID_LEN..=MAX_DEVICE_ID_LEN).contains(&presented.len())
            && presented
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if ok {
            Ok(Self(presented.to_owned()))
        } else {
            Err(InvalidDeviceId)
        }
    }

    /// A new device id for a client that has none (a browser, in its device cookie):
    /// 256 bits from the operating system's randomness, base64url (43 characters).
    pub fn generate() -> Result<Self, RefreshError> {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes).map_err(|e| RefreshError::Random(Box::new(e)))?;
        Ok(Self(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// The id, to hand to the client that will present it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What a family bound to this device keeps.
    pub fn fingerprint(&self) -> DeviceFingerprint {
        DeviceFingerprint::of(self)
    }
}

impl std::str::FromStr for DeviceId {
    type Err = InvalidDeviceId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceId([redacted])")
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A device id that is not 8 to 128 characters of `A-Z a-z 0-9 . _ : -` (code
/// `invalid_device_id`; with the `http` feature, 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the device id must be 8 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'")]
pub struct InvalidDeviceId;

impl InvalidDeviceId {
    /// `invalid_device_id`.
    pub fn code(&self) -> &'static str {
        "invalid_device_id"
    }
}

/// What a refresh family is bound to: the SHA-256 of a device id (see the [module
/// docs](self) for what goes in and why).
///
/// Equality is constant-time (through `subtle`); `Debug` shows the first 4 bytes only.
///
/// ```
/// use upcoach_auth::refresh::{DeviceFingerprint, DeviceId};
///
/// let phone = DeviceId::parse("phone-0001")?;
/// let laptop = DeviceId::parse("laptop-0001")?;
/// assert_ne!(phone.fingerprint(), laptop.fingerprint());
/// let stored = DeviceFingerprint::from_bytes(*phone.fingerprint().as_bytes());
/// assert_eq!(stored, phone.fingerprint());
/// # Ok::<(), upcoach_auth::refresh::InvalidDeviceId>(())
/// ```
#[derive(Clone, Copy)]
pub struct DeviceFingerprint([u8; 32]);

impl DeviceFingerprint {
    /// The fingerprint of `device`.
    pub fn of(device: &DeviceId) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(FINGERPRINT_DOMAIN);
        hasher.update(device.0.as_bytes());
        Self(hasher.finalize().into())
    }

    /// Wraps 32 stored bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether a family bound to `bound` (`None`: not bound, as families opened before
    /// device binding or without a device id) accepts a refresh presenting `presented`.
    /// A bound family accepts only its own fingerprint; a missing one does not match.
    pub fn accepts(bound: Option<&Self>, presented: Option<&Self>) -> bool {
        match (bound, presented) {
            (None, _) => true,
            (Some(bound), Some(presented)) => bound == presented,
            (Some(_), None) => false,
        }
    }
}

impl PartialEq for DeviceFingerprint {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for DeviceFingerprint {}

impl fmt::Debug for DeviceFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceFingerprint(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_checked() {
        for good in [
            "abcdefgh",
            "6F9619FF-8B86-D011-B42D-00CF4FC964FF",
            "ios:vendor.id_1",
            &"a".repeat(MAX_DEVICE_ID_LEN),
        ] {
            assert!(DeviceId::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "abcdefg",
            "with space",
            "slash/slash/",
            "ünïcödé-id",
            "tab\tinside",
            &"a".repeat(MAX_DEVICE_ID_LEN + 1),
        ] {
            assert_eq!(DeviceId::parse(bad), Err(InvalidDeviceId), "{bad:?}");
        }
        let generated = DeviceId::generate().unwrap();
        assert_eq!(generated.expose().len(), 43);
        assert_eq!(DeviceId::parse(generated.expose()), Ok(generated.clone()));
        assert_ne!(generated, DeviceId::generate().unwrap());
    }

    #[test]
    fn the_fingerprint_is_the_domain_separated_sha256_of_the_id() {
        let device = DeviceId::parse("device-0001").unwrap();
        let expected: [u8; 32] = Sha256::digest(b"upcoach-device-v1\0device-0001").into();
        assert_eq!(device.fingerprint().as_bytes(), &expected);
        let text = format!("{:?} {device:?} {device}", device.fingerprint());
        assert!(!text.contains("device-0001"), "{text}");
    }

    #[test]
    fn binding_rules() {
        let a = DeviceId::parse("device-a-0001").unwrap().fingerprint();
        let b = DeviceId::parse("device-b-0001").unwrap().fingerprint();
        assert!(DeviceFingerprint::accepts(None, None));
        assert!(DeviceFingerprint::accepts(None, Some(&a)));
        assert!(DeviceFingerprint::accepts(Some(&a), Some(&a)));
        assert!(!DeviceFingerprint::accepts(Some(&a), Some(&b)));
        assert!(!DeviceFingerprint::accepts(Some(&a), None));
    }
}
