//! Property tests of the cache envelope: any bytes decode to a value or `Corrupt`, never
//! a panic; what `encode` makes decodes to what went in.

use bytes::Bytes;
use proptest::prelude::*;
use upcoach_cache::envelope::{self, TagVersion};

fn tags() -> impl Strategy<Value = Vec<TagVersion>> {
    proptest::collection::vec(("[a-z:_0-9]{1,40}", any::<u64>()), 0..8)
}

/// The first byte of an uncompressed entry.
fn bytes_of_raw() -> Bytes {
    envelope::encode(b"", &[], 0, usize::MAX).unwrap().0
}

proptest! {
    // No regression files written into the tree: a failing input found here is kept as
    // an explicit test beside these.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_decode_or_are_corrupt(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = envelope::decode(Bytes::from(bytes));
    }

    #[test]
    fn what_encode_makes_decodes_to_what_went_in(
        value in proptest::collection::vec(any::<u8>(), 0..4096),
        tags in tags(),
        expires in any::<u64>(),
        threshold in 0usize..2048,
    ) {
        let (bytes, _) = envelope::encode(&value, &tags, expires, threshold).unwrap();
        let decoded = envelope::decode(bytes).unwrap();
        prop_assert_eq!(&decoded.value[..], &value[..]);
        prop_assert_eq!(decoded.tags, tags);
        prop_assert_eq!(decoded.expires_at_ms, expires);
    }

    /// A stored entry damaged anywhere (one byte changed, or cut short) is refused or
    /// read, never a panic. A compressed one cut short is refused (it records its
    /// length); a raw one does not record its length, so cut short it reads as a
    /// shorter value.
    #[test]
    fn a_damaged_entry_never_panics(
        value in proptest::collection::vec(any::<u8>(), 0..4096),
        tags in tags(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        // Repetitive values, so that some are compressed.
        let value: Vec<u8> = value.iter().map(|b| b % 4).collect();
        let (bytes, _) = envelope::encode(&value, &tags, 1, 64).unwrap();
        let mut damaged = bytes.to_vec();
        let i = at.index(damaged.len());
        damaged[i] = byte;
        let _ = envelope::decode(Bytes::from(damaged));
        let compressed = bytes[0] != bytes_of_raw()[0];
        let short = bytes.slice(..cut.index(bytes.len()));
        let read = envelope::decode(short);
        if compressed {
            prop_assert!(read.is_err());
        }
    }
}
