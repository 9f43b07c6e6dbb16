//! The bytes a tiered cache stores: a one-byte codec header, the versions of the entry's
//! tags when it was computed, then the value (LZ4-compressed when that pays).
//!
//! ```text
//! [codec: 0 raw | 1 lz4][tag count: u8]{[tag len: u8][tag][version: u64 LE]}*
//! [expires at: u64 LE, milliseconds since the epoch]
//! raw:  [value]
//! lz4:  [value length: u32 LE][lz4 block]
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{Error, Result};

const RAW: u8 = 0;
const LZ4: u8 = 1;
/// The most tags one entry may carry.
pub const MAX_TAGS: usize = 32;
/// The longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 128;
/// The largest value a compressed entry may claim to expand to (64 MiB): a corrupt or
/// hostile length cannot make the reader allocate more.
pub const MAX_VALUE_LEN: usize = 64 * 1024 * 1024;

/// A tag and the version it had when the value was computed.
pub type TagVersion = (String, u64);

/// An entry read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The value, decompressed.
    pub value: Bytes,
    /// The tags and their versions at write time.
    pub tags: Vec<TagVersion>,
    /// When the entry expires, milliseconds since the epoch.
    pub expires_at_ms: u64,
}

/// Checks tags against the limits every store can hold.
pub fn check_tags<S: AsRef<str>>(tags: &[S]) -> Result<()> {
    if tags.len() > MAX_TAGS {
        return Err(Error::InvalidTag {
            reason: "more than 32 tags",
        });
    }
    for tag in tags {
        let tag = tag.as_ref();
        if tag.is_empty() || tag.len() > MAX_TAG_LEN {
            return Err(Error::InvalidTag {
                reason: "a tag must be 1 to 128 bytes",
            });
        }
    }
    Ok(())
}

/// Encodes `value` with `tags`; compresses it when it is at least `threshold` bytes and
/// compression saves at least 10 %. Returns the bytes and how many compression saved.
pub fn encode(
    value: &[u8],
    tags: &[TagVersion],
    expires_at_ms: u64,
    threshold: usize,
) -> Result<(Bytes, usize)> {
    check_tags(
        tags.iter()
            .map(|(t, _)| t.as_str())
            .collect::<Vec<_>>()
            .as_slice(),
    )?;
    if value.len() > MAX_VALUE_LEN {
        return Err(Error::ValueTooLarge { len: value.len() });
    }
    let tag_bytes: usize = tags.iter().map(|(t, _)| 1 + t.len() + 8).sum();
    let compressed = (value.len() >= threshold)
        .then(|| lz4_flex::block::compress(value))
        .filter(|c| c.len() + 4 <= value.len() - value.len() / 10);
    let body = compressed.as_ref().map_or(value.len(), |c| c.len() + 4);
    let mut out = BytesMut::with_capacity(10 + tag_bytes + body);
    out.put_u8(if compressed.is_some() { LZ4 } else { RAW });
    out.put_u8(tags.len() as u8);
    for (tag, version) in tags {
        out.put_u8(tag.len() as u8);
        out.put_slice(tag.as_bytes());
        out.put_u64_le(*version);
    }
    out.put_u64_le(expires_at_ms);
    let saved = match &compressed {
        Some(c) => {
            out.put_u32_le(value.len() as u32);
            out.put_slice(c);
            value.len() - c.len() - 4
        }
        None => {
            out.put_slice(value);
            0
        }
    };
    Ok((out.freeze(), saved))
}

fn corrupt(reason: &'static str) -> Error {
    Error::Corrupt { reason }
}

/// Decodes what [`encode`] made; anything else is [`Error::Corrupt`], never a panic.
///
/// It takes the stored bytes by value: an uncompressed value is those same bytes past
/// the header, without a copy or a new allocation.
pub fn decode(mut bytes: Bytes) -> Result<Decoded> {
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Result<std::ops::Range<usize>> {
        let end = at
            .checked_add(n)
            .filter(|e| *e <= bytes.len())
            .ok_or(corrupt("the entry is truncated"))?;
        let range = *at..end;
        *at = end;
        Ok(range)
    };
    let codec = bytes[take(&mut at, 1)?][0];
    if codec != RAW && codec != LZ4 {
        return Err(corrupt("unknown codec header"));
    }
    let count = bytes[take(&mut at, 1)?][0] as usize;
    if count > MAX_TAGS {
        return Err(corrupt("too many tags"));
    }
    let mut tags = Vec::with_capacity(count);
    for _ in 0..count {
        let len = bytes[take(&mut at, 1)?][0] as usize;
        // What `encode` refuses to write is not read either (found by the fuzz target
        // `cache_envelope`: an empty tag decoded, then could not be encoded again).
        if len == 0 || len > MAX_TAG_LEN {
            return Err(corrupt("a tag is empty or longer than 128 bytes"));
        }
        let tag = std::str::from_utf8(&bytes[take(&mut at, len)?])
            .map_err(|_| corrupt("a tag is not UTF-8"))?
            .to_owned();
        let version = u64::from_le_bytes(bytes[take(&mut at, 8)?].try_into().expect("8 bytes"));
        tags.push((tag, version));
    }
    let expires_at_ms = u64::from_le_bytes(bytes[take(&mut at, 8)?].try_into().expect("8 bytes"));
    let value = if codec == RAW {
        bytes.advance(at);
        bytes
    } else {
        let len =
            u32::from_le_bytes(bytes[take(&mut at, 4)?].try_into().expect("4 bytes")) as usize;
        // LZ4 expands at most 255:1, so a larger claim is a lie: refuse it before
        // allocating.
        if len > MAX_VALUE_LEN || len > (bytes.len() - at).saturating_mul(255) {
            return Err(corrupt("the stated length is too large"));
        }
        let value = lz4_flex::block::decompress(&bytes[at..], len)
            .map_err(|_| corrupt("LZ4 data is invalid"))?;
        if value.len() != len {
            return Err(corrupt("LZ4 data does not match its stated length"));
        }
        Bytes::from(value)
    };
    Ok(Decoded {
        value,
        tags,
        expires_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags() -> Vec<TagVersion> {
        vec![("analytics".into(), 3), ("dashboard".into(), 0)]
    }

    #[test]
    fn round_trips_raw_and_compressed() {
        let small = b"{\"a\":1}";
        let (bytes, saved) = encode(small, &tags(), 42, 1024).unwrap();
        assert_eq!((bytes[0], saved), (RAW, 0));
        assert_eq!(
            decode(bytes.clone()).unwrap(),
            Decoded {
                value: Bytes::from_static(small),
                tags: tags(),
                expires_at_ms: 42
            }
        );

        let json = serde_json::to_vec(&serde_json::json!({
            "routes": (0..200).map(|i| serde_json::json!({"route": format!("/api/items/{i}"), "count": i, "p95_ms": 12.5})).collect::<Vec<_>>()
        })).unwrap();
        let (bytes, saved) = encode(&json, &[], 0, 1024).unwrap();
        assert_eq!(bytes[0], LZ4);
        assert!(
            saved > json.len() / 2,
            "repetitive JSON compresses well: saved {saved} of {}",
            json.len()
        );
        assert_eq!(decode(bytes.clone()).unwrap().value, Bytes::from(json));
    }

    #[test]
    fn tags_that_encode_refuses_do_not_decode() {
        let entry = |tag: &[u8]| {
            let mut bytes = vec![RAW, 1, tag.len() as u8];
            bytes.extend_from_slice(tag);
            bytes.extend_from_slice(&[0; 16]);
            Bytes::from(bytes)
        };
        assert!(decode(entry(b"user:1")).is_ok());
        for tag in [&b""[..], &[b'a'; MAX_TAG_LEN + 1][..]] {
            assert!(encode(b"v", &[(String::from_utf8(tag.to_vec()).unwrap(), 0)], 0, 0).is_err());
            assert!(
                matches!(decode(entry(tag)), Err(Error::Corrupt { .. })),
                "a tag of {} bytes",
                tag.len()
            );
        }
    }

    #[test]
    fn incompressible_values_stay_raw() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..8192)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let (bytes, saved) = encode(&noise, &[], 0, 1024).unwrap();
        assert_eq!(
            (bytes[0], saved),
            (RAW, 0),
            "kept raw when compression saves < 10 %"
        );
        assert_eq!(decode(bytes.clone()).unwrap().value.as_ref(), &noise[..]);
        let (empty, _) = encode(b"", &[], 0, 0).unwrap();
        assert_eq!(decode(empty).unwrap().value.len(), 0);
    }

    #[test]
    fn corrupt_entries_are_errors_not_panics() {
        let (good, _) = encode(&vec![b'a'; 4096], &tags(), 7, 1024).unwrap();
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![7],
            vec![0],
            vec![1, 0, 255, 255, 255, 255],
            vec![0, 40],
        ];
        for cut in 0..good.len() {
            cases.push(good[..cut].to_vec());
        }
        let mut flipped = good.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xFF;
        flipped[30] ^= 0xFF;
        cases.push(flipped);
        let mut huge = vec![LZ4, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        cases.push(huge);
        for case in cases {
            match decode(Bytes::from(case.clone())) {
                Err(Error::Corrupt { .. }) => {}
                Ok(d) => assert!(case.len() >= 2, "decoded {d:?} from {case:?}"),
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn tag_limits() {
        assert!(check_tags(&[""]).is_err());
        assert!(check_tags(&["x".repeat(129)]).is_err());
        assert!(check_tags(&vec!["t"; 33]).is_err());
        assert!(check_tags(&["analytics", "dashboard"]).is_ok());
    }
}
