//! Key canonicalization shared by every store.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Keys up to this many bytes are stored as they are; longer keys are stored under
/// their first 64 bytes and a SHA-256 digest of the whole key.
pub const MAX_KEY_LEN: usize = 256;

/// The key a store really uses for `key`: the key itself, or for a key longer than
/// [`MAX_KEY_LEN`], `<first 64 bytes>#sha256:<hex digest>` (cut on a character
/// boundary). An empty key is refused.
///
/// ```
/// use upcoach_cache::canonical_key;
///
/// assert_eq!(canonical_key("user:42").unwrap(), "user:42");
/// let long = "k".repeat(10_000);
/// assert!(canonical_key(&long).unwrap().len() < 150);
/// assert!(canonical_key("").is_err());
/// ```
pub fn canonical_key(key: &str) -> Result<Cow<'_, str>> {
    if key.is_empty() {
        return Err(Error::InvalidKey {
            reason: "the key is empty",
        });
    }
    // A short key that looks like a digest form is hashed too, so it cannot collide
    // with a long key's digest form.
    if key.len() <= MAX_KEY_LEN && !(key.as_bytes().contains(&b'#') && key.contains("#sha256:")) {
        return Ok(Cow::Borrowed(key));
    }
    let mut cut = 64;
    while !key.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(Cow::Owned(format!("{}#sha256:{hex}", &key[..cut])))
}
