//! The conformance suites every [`CacheStore`] and every [`TagVersions`] pass (feature
//! `testing`).

use std::time::Duration;

use bytes::Bytes;

use crate::{CacheStore, CacheStoreExt, Error, MAX_TTL, TagVersions};

pub use upcoach_core::testing::{MoveClock, PassTime, Sleep};

/// Checks an empty `store` (its own prefix or instance): misses, round trips, binary,
/// large, empty and unicode values and keys, very long keys, batches, expiry, refusals
/// and the typed helpers. Panics with a message at the first difference.
pub async fn cache_store_conformance(store: &dyn CacheStore, time: &dyn PassTime) {
    let ttl = Duration::from_secs(60);

    // Misses.
    assert_eq!(store.get("missing").await.unwrap(), None);
    assert!(!store.exists("missing").await.unwrap());
    assert!(!store.delete("missing").await.unwrap());

    // Round trip, overwrite, delete.
    store
        .set("k", Bytes::from_static(b"v1"), ttl)
        .await
        .unwrap();
    assert_eq!(store.get("k").await.unwrap().as_deref(), Some(&b"v1"[..]));
    assert!(store.exists("k").await.unwrap());
    store
        .set("k", Bytes::from_static(b"v2"), ttl)
        .await
        .unwrap();
    assert_eq!(
        store.get("k").await.unwrap().as_deref(),
        Some(&b"v2"[..]),
        "overwrite"
    );
    assert!(store.delete("k").await.unwrap());
    assert_eq!(store.get("k").await.unwrap(), None, "deleted");
    assert!(!store.delete("k").await.unwrap(), "deleting twice");

    // Values: every byte, large, empty (present, not a miss).
    let binary: Bytes = (0..=255u8).cycle().take(4096).collect::<Vec<_>>().into();
    store.set("binary", binary.clone(), ttl).await.unwrap();
    assert_eq!(store.get("binary").await.unwrap(), Some(binary));
    let large = Bytes::from(vec![0xA5u8; 1024 * 1024]);
    store.set("large", large.clone(), ttl).await.unwrap();
    assert_eq!(
        store.get("large").await.unwrap(),
        Some(large),
        "1 MiB value"
    );
    store.set("empty", Bytes::new(), ttl).await.unwrap();
    assert_eq!(
        store.get("empty").await.unwrap(),
        Some(Bytes::new()),
        "an empty value is a hit"
    );
    assert!(store.exists("empty").await.unwrap());

    // Keys: unicode, separators, very long (and two long keys that share a beginning).
    for key in [
        "ключ:🔑:キー",
        "with space",
        "a:b:c",
        "line\nbreak",
        "tab\tand\"quote",
    ] {
        store
            .set(key, Bytes::from(key.to_owned()), ttl)
            .await
            .unwrap();
        assert_eq!(
            store.get(key).await.unwrap(),
            Some(Bytes::from(key.to_owned())),
            "{key:?}"
        );
    }
    let long_a = "x".repeat(10_000) + "a";
    let long_b = "x".repeat(10_000) + "b";
    store
        .set(&long_a, Bytes::from_static(b"A"), ttl)
        .await
        .unwrap();
    store
        .set(&long_b, Bytes::from_static(b"B"), ttl)
        .await
        .unwrap();
    assert_eq!(
        store.get(&long_a).await.unwrap().as_deref(),
        Some(&b"A"[..])
    );
    assert_eq!(
        store.get(&long_b).await.unwrap().as_deref(),
        Some(&b"B"[..])
    );
    assert!(store.delete(&long_a).await.unwrap());
    assert_eq!(
        store.get(&long_b).await.unwrap().as_deref(),
        Some(&b"B"[..])
    );

    // Batches keep order, misses included.
    store
        .set_many(&[
            ("b1", Bytes::from_static(b"1"), ttl),
            ("b2", Bytes::from_static(b"2"), ttl),
            ("b3", Bytes::new(), ttl),
        ])
        .await
        .unwrap();
    let got = store.get_many(&["b1", "nope", "b3", "b2"]).await.unwrap();
    assert_eq!(
        got,
        vec![
            Some(Bytes::from_static(b"1")),
            None,
            Some(Bytes::new()),
            Some(Bytes::from_static(b"2"))
        ]
    );
    assert!(store.get_many(&[]).await.unwrap().is_empty());
    store.set_many(&[]).await.unwrap();

    // Expiry.
    store
        .set(
            "short",
            Bytes::from_static(b"s"),
            Duration::from_millis(300),
        )
        .await
        .unwrap();
    store
        .set("long", Bytes::from_static(b"l"), Duration::from_secs(30))
        .await
        .unwrap();
    time.pass(Duration::from_millis(100)).await;
    assert!(
        store.get("short").await.unwrap().is_some(),
        "not expired yet"
    );
    time.pass(Duration::from_millis(300)).await;
    assert_eq!(store.get("short").await.unwrap(), None, "expired");
    assert!(!store.exists("short").await.unwrap());
    assert!(
        !store.delete("short").await.unwrap(),
        "an expired key is not there to delete"
    );
    assert!(store.get("long").await.unwrap().is_some(), "its own TTL");
    store
        .set_many(&[(
            "batch_ttl",
            Bytes::from_static(b"t"),
            Duration::from_millis(300),
        )])
        .await
        .unwrap();
    time.pass(Duration::from_millis(400)).await;
    assert_eq!(
        store.get("batch_ttl").await.unwrap(),
        None,
        "set_many TTLs apply"
    );

    // Refusals store nothing.
    assert!(matches!(store.get("").await, Err(Error::InvalidKey { .. })));
    assert!(matches!(
        store.set("", Bytes::new(), ttl).await,
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        store.set("z", Bytes::new(), Duration::ZERO).await,
        Err(Error::InvalidTtl { .. })
    ));
    assert!(matches!(
        store
            .set("z", Bytes::new(), MAX_TTL + Duration::from_secs(1))
            .await,
        Err(Error::InvalidTtl { .. })
    ));
    assert!(
        store
            .set_many(&[
                ("y1", Bytes::new(), ttl),
                ("y2", Bytes::new(), Duration::ZERO)
            ])
            .await
            .is_err()
    );
    assert_eq!(
        store.get_many(&["z", "y1", "y2"]).await.unwrap(),
        vec![None, None, None]
    );

    // Typed helpers.
    store
        .set_json("json", &serde_json::json!({"a": [1, 2]}), ttl)
        .await
        .unwrap();
    let value: Option<serde_json::Value> = store.get_json("json").await.unwrap();
    assert_eq!(value.unwrap()["a"][1], 2);
    store
        .set("not_json", Bytes::from_static(b"\xff{"), ttl)
        .await
        .unwrap();
    assert!(matches!(
        store.get_json::<serde_json::Value>("not_json").await,
        Err(Error::Serde(_))
    ));
}

/// Checks empty tag counters (their own prefix or instance): unknown tags are at 0,
/// bumps count up per tag and answer in order, a batch touches only its own tags (on a
/// Redis Cluster, tags fall in different slots), and empty batches are no-ops. Panics
/// with a message at the first difference.
pub async fn tag_versions_conformance(tags: &dyn TagVersions) {
    assert!(tags.versions(&[]).await.unwrap().is_empty());
    assert!(tags.bump(&[]).await.unwrap().is_empty());
    assert_eq!(
        tags.versions(&["a", "b"]).await.unwrap(),
        vec![0, 0],
        "a tag never bumped is at 0"
    );
    assert_eq!(tags.bump(&["a"]).await.unwrap(), vec![1]);
    // Enough tags that, on a cluster, they span every node.
    let many: Vec<String> = (0..32).map(|i| format!("t{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(tags.bump(&many).await.unwrap(), vec![1; 32]);
    let mut mixed = vec!["a"];
    mixed.extend_from_slice(&many[..5]);
    mixed.push("b");
    assert_eq!(
        tags.bump(&mixed).await.unwrap(),
        vec![2, 2, 2, 2, 2, 2, 1],
        "each tag counts on, in the order asked"
    );
    let mut asked = vec!["a", "never"];
    asked.extend_from_slice(&many);
    let mut want = vec![2u64, 0];
    want.extend(std::iter::repeat_n(2, 5));
    want.extend(std::iter::repeat_n(1, 27));
    assert_eq!(
        tags.versions(&asked).await.unwrap(),
        want,
        "read back in order"
    );
    assert_eq!(
        tags.versions(&["b", "a", "b"]).await.unwrap(),
        vec![1, 2, 1],
        "a repeated tag is answered each time"
    );
}
