//! [`RefreshToken`] and its [`TokenHash`].

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use super::RefreshError;

/// How many bytes of randomness a refresh token carries (256 bits).
pub const TOKEN_BYTES: usize = 32;
/// How many characters a refresh token has (base64url of [`TOKEN_BYTES`], no padding).
pub const TOKEN_LEN: usize = 43;

/// An opaque refresh token as handed to a client.
///
/// `Debug` and `Display` print `[redacted]`; read it with [`RefreshToken::expose`] only
/// to put it in the response.
///
/// ```
/// use upcoach_auth::refresh::RefreshToken;
///
/// let token = RefreshToken::generate()?;
/// assert_eq!(token.expose().len(), 43);
/// assert_eq!(format!("{token:?}"), "RefreshToken([redacted])");
/// assert_eq!(token.hash(), RefreshToken::from(token.expose().to_owned()).hash());
/// # Ok::<(), upcoach_auth::refresh::RefreshError>(())
/// ```
#[derive(Clone)]
pub struct RefreshToken(String);

/// Compared in constant time.
impl PartialEq for RefreshToken {
    fn eq(&self, other: &Self) -> bool {
        upcoach_core::secret::constant_time_eq(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl Eq for RefreshToken {}

impl RefreshToken {
    /// A new token: [`TOKEN_BYTES`] from the operating system's randomness, base64url.
    pub fn generate() -> Result<Self, RefreshError> {
        let mut bytes = [0u8; TOKEN_BYTES];
        getrandom::getrandom(&mut bytes).map_err(|e| RefreshError::Random(Box::new(e)))?;
        Ok(Self(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// The token text, for the client.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The SHA-256 of the token text: what the stores keep.
    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }

    /// Whether `presented` has the shape of a token we issue (43 base64url characters).
    /// Anything else is refused before any store is asked.
    pub fn is_well_formed(presented: &str) -> bool {
        presented.len() == TOKEN_LEN
            && presented
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }
}

impl From<String> for RefreshToken {
    /// Wraps a token text received from a client (not checked; see
    /// [`RefreshToken::is_well_formed`]).
    fn from(token: String) -> Self {
        Self(token)
    }
}

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RefreshToken([redacted])")
    }
}

impl fmt::Display for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The SHA-256 of a refresh token's text: how a store finds a token without keeping it.
///
/// Equality is constant-time (through `subtle`); `Debug` shows the first 4 bytes only.
#[derive(Clone, Copy)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// The hash of a presented token text.
    pub fn of(presented: &str) -> Self {
        Self(Sha256::digest(presented.as_bytes()).into())
    }
}

crate::digest::sha256_newtype!(TokenHash);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_43_base64url_characters_and_distinct() {
        let a = RefreshToken::generate().unwrap();
        let b = RefreshToken::generate().unwrap();
        assert_ne!(a, b);
        assert!(RefreshToken::is_well_formed(a.expose()));
        assert_eq!(URL_SAFE_NO_PAD.decode(a.expose()).unwrap().len(), 32);
        assert!(!RefreshToken::is_well_formed(""));
        assert!(!RefreshToken::is_well_formed(&"a".repeat(44)));
        assert!(!RefreshToken::is_well_formed(&format!(
            "{}=",
            &a.expose()[..42]
        )));
        assert!(!RefreshToken::is_well_formed(&"é".repeat(21)));
    }

    #[test]
    fn hashes_are_sha256_of_the_text() {
        let hash = TokenHash::of("abc");
        assert_eq!(
            format!("{hash:?}"),
            "TokenHash(ba7816bf…)",
            "SHA-256(\"abc\") starts ba7816bf"
        );
        assert_eq!(hash, TokenHash::from_bytes(*hash.as_bytes()));
        assert_ne!(hash, TokenHash::of("abd"));
    }
}
