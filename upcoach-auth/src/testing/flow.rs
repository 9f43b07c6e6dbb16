//! The conformance suite every [`FlowStore`] passes (feature `testing`).
//!
//! ```
//! use std::sync::Arc;
//! use upcoach_auth::flow::MemoryFlowStore;
//! use upcoach_auth::testing::flow::{MoveClock, flow_store_conformance};
//! use upcoach_core::ManualClock;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let clock = Arc::new(ManualClock::starting_now());
//! let store = MemoryFlowStore::builder().clock(clock.clone()).build();
//! flow_store_conformance(&store, &MoveClock(clock)).await;
//! # });
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::users::join_all;
use crate::flow::{FlowError, FlowStore, FlowStoreExt, MAX_KEY_LEN, MAX_TTL, MAX_VALUE_LEN};

pub use upcoach_core::testing::{MoveClock, PassTime, Sleep};

const TTL: Duration = Duration::from_secs(60);

/// Checks an empty `store` (its own prefix or instance): round trips, one-time takes,
/// refusal to overwrite a live key, binary, empty and largest values, the key, value and
/// time-to-live limits, expiry (`time` lets about one second pass), 50 concurrent takes
/// of one key (exactly one gets the value), concurrent puts of one key (exactly one
/// wins), and the JSON helpers. Panics with a message at the first difference.
pub async fn flow_store_conformance(store: &dyn FlowStore, time: &dyn PassTime) {
    round_trips_once(store).await;
    refuses_to_overwrite(store).await;
    keeps_every_value(store).await;
    checks_keys_values_and_ttls(store).await;
    expires(store, time).await;
    one_take_wins(store).await;
    typed_helpers(store).await;
}

async fn round_trips_once(store: &dyn FlowStore) {
    assert_eq!(store.take("missing").await.unwrap(), None);
    store.put("state:once", b"nonce=1", TTL).await.unwrap();
    assert_eq!(
        store.take("state:once").await.unwrap().as_deref(),
        Some(&b"nonce=1"[..])
    );
    assert_eq!(
        store.take("state:once").await.unwrap(),
        None,
        "a value is taken at most once"
    );

    // Many keys side by side, each its own.
    for i in 0..20 {
        store
            .put(&format!("many:{i}"), format!("v{i}").as_bytes(), TTL)
            .await
            .unwrap();
    }
    for i in (0..20).rev() {
        assert_eq!(
            store.take(&format!("many:{i}")).await.unwrap(),
            Some(format!("v{i}").into_bytes())
        );
    }
    // Keys that look alike are different keys.
    for key in ["alike", "alike:", "Alike", "alike2"] {
        store.put(key, key.as_bytes(), TTL).await.unwrap();
    }
    for key in ["alike2", "alike", "Alike", "alike:"] {
        assert_eq!(
            store.take(key).await.unwrap().as_deref(),
            Some(key.as_bytes())
        );
    }
}

async fn refuses_to_overwrite(store: &dyn FlowStore) {
    store.put("dup", b"first", TTL).await.unwrap();
    match store.put("dup", b"second", TTL).await {
        Err(e @ FlowError::KeyExists) => {
            assert_eq!(e.code(), "flow_key_exists");
            assert!(!e.is_retryable());
        }
        other => panic!("a second put of a live key: {other:?}"),
    }
    assert_eq!(
        store.take("dup").await.unwrap().as_deref(),
        Some(&b"first"[..]),
        "the refused put changed nothing"
    );
    // Once taken, the key is free again (a new value, not the old one).
    store.put("dup", b"third", TTL).await.unwrap();
    assert_eq!(
        store.take("dup").await.unwrap().as_deref(),
        Some(&b"third"[..])
    );
}

async fn keeps_every_value(store: &dyn FlowStore) {
    let binary: Vec<u8> = (0..=255u8).cycle().take(MAX_VALUE_LEN).collect();
    store.put("binary", &binary, TTL).await.unwrap();
    assert_eq!(
        store.take("binary").await.unwrap(),
        Some(binary),
        "every byte, largest value"
    );
    store.put("empty", b"", TTL).await.unwrap();
    assert_eq!(
        store.take("empty").await.unwrap(),
        Some(Vec::new()),
        "an empty value is a value, not a miss"
    );
    assert_eq!(store.take("empty").await.unwrap(), None);
    let text = "ünïcødé 🚀 \"quoted\" \\ \0 end";
    store.put("text", text.as_bytes(), TTL).await.unwrap();
    assert_eq!(
        store.take("text").await.unwrap().as_deref(),
        Some(text.as_bytes())
    );
}

async fn checks_keys_values_and_ttls(store: &dyn FlowStore) {
    // Every printable ASCII character is a key character; the longest key works.
    let printable: String = (b'!'..=b'~').map(char::from).collect();
    let longest = "k".repeat(MAX_KEY_LEN);
    for key in [printable.as_str(), longest.as_str()] {
        store.put(key, b"ok", TTL).await.unwrap();
        assert_eq!(
            store.take(key).await.unwrap().as_deref(),
            Some(&b"ok"[..]),
            "{key:?}"
        );
    }

    let too_long = "k".repeat(MAX_KEY_LEN + 1);
    for key in [
        "",
        "with space",
        "line\nbreak",
        "tab\t",
        "ключ",
        too_long.as_str(),
    ] {
        match store.put(key, b"v", TTL).await {
            Err(e @ FlowError::InvalidKey { .. }) => assert_eq!(e.code(), "invalid_flow_key"),
            other => panic!("put with key {key:?}: {other:?}"),
        }
        assert!(
            matches!(store.take(key).await, Err(FlowError::InvalidKey { .. })),
            "take with key {key:?}"
        );
    }

    match store.put("big", &vec![0u8; MAX_VALUE_LEN + 1], TTL).await {
        Err(e @ FlowError::ValueTooLarge { len, max }) => {
            assert_eq!((len, max), (MAX_VALUE_LEN + 1, MAX_VALUE_LEN));
            assert_eq!(e.code(), "flow_value_too_large");
        }
        other => panic!("a value over the limit: {other:?}"),
    }
    assert_eq!(store.take("big").await.unwrap(), None, "nothing was stored");

    for ttl in [Duration::ZERO, MAX_TTL + Duration::from_millis(1)] {
        match store.put("ttl", b"v", ttl).await {
            Err(e @ FlowError::InvalidTtl { .. }) => assert_eq!(e.code(), "invalid_flow_ttl"),
            other => panic!("ttl {ttl:?}: {other:?}"),
        }
    }
    assert_eq!(store.take("ttl").await.unwrap(), None);
    store.put("ttl", b"hour", MAX_TTL).await.unwrap();
    assert_eq!(
        store.take("ttl").await.unwrap().as_deref(),
        Some(&b"hour"[..])
    );
}

async fn expires(store: &dyn FlowStore, time: &dyn PassTime) {
    store
        .put("short", b"s", Duration::from_millis(300))
        .await
        .unwrap();
    store
        .put("untaken", b"u", Duration::from_millis(300))
        .await
        .unwrap();
    store.put("long", b"l", TTL).await.unwrap();
    time.pass(Duration::from_millis(900)).await;
    assert_eq!(
        store.take("short").await.unwrap(),
        None,
        "an expired value is gone"
    );
    assert_eq!(
        store.take("long").await.unwrap().as_deref(),
        Some(&b"l"[..]),
        "a live value is still there"
    );
    // An expired key can be used again.
    store.put("untaken", b"again", TTL).await.unwrap();
    assert_eq!(
        store.take("untaken").await.unwrap().as_deref(),
        Some(&b"again"[..])
    );
}

async fn one_take_wins(store: &dyn FlowStore) {
    store.put("race", b"prize", TTL).await.unwrap();
    let takes = join_all((0..50).map(|_| store.take("race")).collect()).await;
    let winners: Vec<Vec<u8>> = takes
        .into_iter()
        .filter_map(|t| t.expect("a take does not fail"))
        .collect();
    assert_eq!(
        winners,
        [b"prize".to_vec()],
        "of 50 concurrent takes, exactly one gets the value"
    );

    let values: Vec<String> = (0..10).map(|i| format!("writer-{i}")).collect();
    let puts = join_all(
        values
            .iter()
            .map(|v| store.put("race:put", v.as_bytes(), TTL))
            .collect(),
    )
    .await;
    let won: Vec<usize> = puts
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.is_ok().then_some(i))
        .collect();
    assert_eq!(won.len(), 1, "exactly one of 10 concurrent puts: {puts:?}");
    assert!(
        puts.iter()
            .all(|p| matches!(p, Ok(()) | Err(FlowError::KeyExists)))
    );
    assert_eq!(
        store.take("race:put").await.unwrap(),
        Some(values[won[0]].clone().into_bytes()),
        "the winner's value is stored"
    );
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Flow {
    nonce: String,
    verifier: String,
    return_to: Option<String>,
}

async fn typed_helpers(store: &dyn FlowStore) {
    let flow = Flow {
        nonce: "n-0S3".into(),
        verifier: "v".repeat(64),
        return_to: Some("https://app.example/after?x=1".into()),
    };
    store.put_json("typed", &flow, TTL).await.unwrap();
    assert_eq!(store.take_json::<Flow>("typed").await.unwrap(), Some(flow));
    assert_eq!(store.take_json::<Flow>("typed").await.unwrap(), None);

    store.put("not-json", b"\xff{", TTL).await.unwrap();
    match store.take_json::<Flow>("not-json").await {
        Err(e @ FlowError::Serde(_)) => assert_eq!(e.code(), "invalid_flow_value"),
        other => panic!("a value that is not JSON: {other:?}"),
    }
    assert_eq!(
        store.take("not-json").await.unwrap(),
        None,
        "taken all the same"
    );
}
