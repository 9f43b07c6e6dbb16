//! [`ConfirmationCode`] and [`SubjectHash`].

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use super::DeletionError;
use crate::ProviderId;

/// How many random bytes a confirmation code carries (128 bits).
pub const CODE_BYTES: usize = 16;
/// How many characters a confirmation code has (base64url of [`CODE_BYTES`], no padding).
pub const CODE_LEN: usize = 22;

/// The code a person follows their data-deletion request with: 16 bytes from the
/// operating system's randomness, base64url without padding (22 characters).
///
/// It is not a secret (it is shown to the person, and it reveals only a request's
/// status), so `Debug` and `Display` print it.
///
/// ```
/// use upcoach_auth::deletion::ConfirmationCode;
///
/// let code = ConfirmationCode::generate()?;
/// assert_eq!(code.as_str().len(), 22);
/// assert_eq!(ConfirmationCode::parse(code.as_str()), Some(code.clone()));
/// assert_eq!(format!("{code:?}"), format!("ConfirmationCode({code})"));
/// // Any other shape is refused without asking a store.
/// assert_eq!(ConfirmationCode::parse("../../etc/passwd"), None);
/// # Ok::<(), upcoach_auth::deletion::DeletionError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ConfirmationCode(String);

impl ConfirmationCode {
    /// A new code: [`CODE_BYTES`] from the operating system's randomness, base64url.
    pub fn generate() -> Result<Self, DeletionError> {
        let mut bytes = [0u8; CODE_BYTES];
        getrandom::getrandom(&mut bytes).map_err(|e| DeletionError::Random(Box::new(e)))?;
        Ok(Self(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// The code in `text` if it has exactly the shape [`generate`](Self::generate) makes:
    /// [`CODE_LEN`] base64url characters encoding [`CODE_BYTES`] bytes (so the unused
    /// low bits of the last character are zero). Anything else is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != CODE_LEN
            || !text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return None;
        }
        // The decoder refuses a last character with stray low bits, so each code has
        // exactly one spelling.
        let mut bytes = [0u8; CODE_BYTES + 2];
        match URL_SAFE_NO_PAD.decode_slice(text, &mut bytes) {
            Ok(CODE_BYTES) => Some(Self(text.to_owned())),
            _ => None,
        }
    }

    /// The code's text, for the response and the status URL.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ConfirmationCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConfirmationCode({})", self.0)
    }
}

impl fmt::Display for ConfirmationCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a store knows a person without keeping their subject: the SHA-256 of
/// `provider \0 subject` (the provider's name, a NUL byte, the subject).
///
/// Plain, not keyed, so every process and backend computes the same one; see the
/// [module docs](super) for what that means. Equality is constant-time (through
/// `subtle`); `Debug` shows the first 4 bytes only.
///
/// ```
/// use upcoach_auth::ProviderId;
/// use upcoach_auth::deletion::SubjectHash;
///
/// let facebook: ProviderId = "facebook".parse()?;
/// let google: ProviderId = "google".parse()?;
/// let hash = SubjectHash::of(&facebook, "10158872345");
/// assert_eq!(hash, SubjectHash::of(&facebook, "10158872345"));
/// assert_ne!(hash, SubjectHash::of(&google, "10158872345"));
/// # Ok::<(), upcoach_auth::Error>(())
/// ```
#[derive(Clone, Copy)]
pub struct SubjectHash([u8; 32]);

impl SubjectHash {
    /// The hash of `provider`'s `subject`.
    pub fn of(provider: &ProviderId, subject: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(provider.as_str().as_bytes());
        hasher.update([0u8]);
        hasher.update(subject.as_bytes());
        Self(hasher.finalize().into())
    }
}

crate::digest::sha256_newtype!(SubjectHash);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_22_base64url_characters_and_distinct() {
        let a = ConfirmationCode::generate().unwrap();
        let b = ConfirmationCode::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), CODE_LEN);
        assert_eq!(
            URL_SAFE_NO_PAD.decode(a.as_str()).unwrap().len(),
            CODE_BYTES
        );
        assert_eq!(ConfirmationCode::parse(a.as_str()), Some(a.clone()));
        assert_eq!(a.to_string(), a.as_str());
    }

    #[test]
    fn parse_accepts_only_the_generated_shape() {
        let zeros = URL_SAFE_NO_PAD.encode([0u8; CODE_BYTES]);
        assert_eq!(zeros, "AAAAAAAAAAAAAAAAAAAAAA");
        assert!(ConfirmationCode::parse(&zeros).is_some());
        assert!(ConfirmationCode::parse("-_-_-_-_-_-_-_-_-_-_-w").is_some());
        for bad in [
            "",
            "AAAAAAAAAAAAAAAAAAAAA",                       // 21
            "AAAAAAAAAAAAAAAAAAAAAAA",                     // 23
            "AAAAAAAAAAAAAAAAAAAAAA==",                    // padded
            "AAAAAAAAAAAAAAAAAAAAAB",                      // stray low bits
            "AAAAAAAAAAAAAAAAAAAA+A",                      // standard alphabet
            "AAAAAAAAAAAAAAAAAAAA/A",                      // standard alphabet
            "AAAAAAAAAAAAAAAAAAAA A",                      // a space
            "AAAAAAAAAAAAAAAAAAAAé",                       // not ASCII (22 bytes)
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", // a refresh token's length
        ] {
            assert_eq!(ConfirmationCode::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn subject_hashes_are_sha256_of_provider_nul_subject() {
        let facebook: ProviderId = "facebook".parse().unwrap();
        let hash = SubjectHash::of(&facebook, "subject-42");
        let expected: [u8; 32] = Sha256::digest(b"facebook\x00subject-42").into();
        assert_eq!(hash.as_bytes(), &expected);
        assert_eq!(hash, SubjectHash::from_bytes(expected));
        assert_ne!(hash, SubjectHash::of(&facebook, "subject-43"));
        let shown = format!("{hash:?}");
        assert_eq!(
            shown,
            format!(
                "SubjectHash({:02x}{:02x}{:02x}{:02x}…)",
                expected[0], expected[1], expected[2], expected[3]
            )
        );
        assert!(!shown.contains("subject"));
    }
}
