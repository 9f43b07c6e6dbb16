//! The bodies of upcoach's fuzz targets: each takes the fuzzer's bytes, hands them to a
//! crate's real parsing entry point, and checks what must hold for any input (no panic,
//! a value or an error, bounded output, a round trip where there is one).
//!
//! `fuzz_targets/<name>.rs` calls [`TARGETS`]' `<name>` under libFuzzer
//! (`RUSTC_BOOTSTRAP=1 cargo fuzz run <name>`, see `fuzz/run.sh`); the workspace's
//! `tests/fuzz_regressions.rs` includes this file and replays every input kept under
//! `fuzz/regressions/<name>/` and `fuzz/seeds/<name>/` on stable Rust, so `cargo test`
//! re-runs what the fuzzer once found.
// Included as a module by the workspace's tests/fuzz_regressions.rs, where `pub` items
// are reachable only from that test.
#![allow(unreachable_pub)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;

/// A target: its name (the directory of its kept inputs) and its body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by name.
pub const TARGETS: &[Target] = &[
    ("ws_client_message", ws_client_message),
    ("sse_cursor", sse_cursor),
    ("cache_envelope", cache_envelope),
    ("sql_digest", sql_digest),
    ("facebook_signed_request", facebook_signed_request),
    ("apple_notification", apple_notification),
    ("id_token_header", id_token_header),
    ("callback_form", callback_form),
    ("server_config", server_config),
    ("server_request", server_request),
];

/// The input as text, if it is UTF-8 (the parsers below take `&str` from callers that
/// have already refused anything else).
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// A WebSocket client's text frame, as the connection reads it: strict JSON of one of
/// the four message types, and a valid room where one is named.
pub fn ws_client_message(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if let Ok(kind) = upcoach_realtime::fuzzing::client_message(text) {
        // Whatever is accepted was a JSON object naming that type.
        let value: serde_json::Value = serde_json::from_str(text).expect("accepted JSON");
        assert_eq!(value["type"], kind, "{text:?}");
        // Strictly: no field but those of its type.
        let allowed: &[&str] = match kind {
            "subscribe" => &["type", "room", "since", "epoch"],
            "unsubscribe" => &["type", "room"],
            "auth" => &["type", "token"],
            _ => &["type"],
        };
        let fields = value.as_object().expect("an object");
        assert!(
            fields.keys().all(|k| allowed.contains(&k.as_str())),
            "{text:?}"
        );
    }
}

/// An SSE cursor, as `Last-Event-ID` or `last_event_id=`: a cursor or a reason, and a
/// cursor reads back what it prints.
pub fn sse_cursor(data: &[u8]) {
    let Some(text) = text(data) else { return };
    if let Ok(cursor) = text.parse::<upcoach_realtime::Cursor>() {
        let printed = cursor.to_string();
        let again: upcoach_realtime::Cursor = printed.parse().expect("a printed cursor parses");
        assert_eq!(again, cursor, "{text:?} printed as {printed:?}");
    }
}

/// A cache entry as stored in Redis: any bytes decode to an entry or `Corrupt`; an
/// entry that decodes encodes again to one that decodes the same.
pub fn cache_envelope(data: &[u8]) {
    use upcoach_cache::envelope;
    let Ok(decoded) = envelope::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    for threshold in [usize::MAX, 0] {
        let (bytes, _) = envelope::encode(
            &decoded.value,
            &decoded.tags,
            decoded.expires_at_ms,
            threshold,
        )
        .expect("what decoded encodes");
        let again = envelope::decode(bytes).expect("what encoded decodes");
        assert_eq!(again.value, decoded.value);
        assert_eq!(again.tags, decoded.tags);
        assert_eq!(again.expires_at_ms, decoded.expires_at_ms);
    }
}

/// A statement, as the slow-query log digests it: any text, a bounded digest.
pub fn sql_digest(data: &[u8]) {
    let Some(sql) = text(data) else { return };
    let digest = upcoach_perf::slow::normalize_sql(sql);
    assert!(digest.len() <= sql.len() + 2 * 2048, "{sql:?} → {digest:?}");
}

/// The app secret of the Facebook targets.
const FACEBOOK_APP_SECRET: &str = "fuzz-facebook-app-secret";

/// A `signed_request` signed with [`FACEBOOK_APP_SECRET`] over `payload_b64` (the
/// base64url text of the payload), so a target reaches the payload parser.
fn facebook_sign(payload_b64: &str) -> String {
    let secret = upcoach_core::Secret::new(FACEBOOK_APP_SECRET);
    // appsecret_proof is the hex HMAC-SHA256 of its text under the app secret: the
    // signature Facebook puts before the payload, as hex.
    let hex = upcoach_auth::facebook::appsecret_proof(payload_b64, &secret);
    let raw: Vec<u8> = (0..hex.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect();
    format!("{}.{payload_b64}", base64url(&raw))
}

/// Base64url without padding (the encoding of JWTs and `signed_request`).
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// Facebook's `signed_request`: the first byte chooses whether the rest is the field as
/// sent (any text) or a payload that the target signs with the app secret, so that the
/// payload's JSON is read. A correctly signed one is never refused for its signature.
pub fn facebook_signed_request(data: &[u8]) {
    use upcoach_auth::facebook::{FacebookError, SignedRequest};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some(rest) = text(rest) else { return };
    let secret = upcoach_core::Secret::new(FACEBOOK_APP_SECRET);
    if mode & 1 == 0 {
        let _ = SignedRequest::verify(rest, &secret);
        return;
    }
    if rest.is_empty() {
        // An empty payload is malformed, signed or not.
        return;
    }
    let payload = base64url(rest.as_bytes());
    let signed = facebook_sign(&payload);
    match SignedRequest::verify(&signed, &secret) {
        Ok(request) => assert!(!request.user_id.is_empty()),
        Err(FacebookError::SignedRequestBadSignature | FacebookError::SignedRequestMalformed) => {
            panic!("a correctly signed request was refused for its form: {signed:?}")
        }
        Err(_) => {}
    }
}

/// Apple's server-to-server notification: the body Apple posts, and the claims of its
/// JWT (the input read as a JSON object). A notification that reads has a key to
/// process it once by.
pub fn apple_notification(data: &[u8]) {
    use upcoach_auth::apple::{AppleNotification, notification_payload};
    if let Ok(payload) = notification_payload(data) {
        assert!(!payload.is_empty());
    }
    let Ok(claims) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(data)
    else {
        return;
    };
    if let Ok(notification) = AppleNotification::from_claims(&claims) {
        let key = notification.idempotency_key();
        match &notification.jti {
            Some(jti) => assert_eq!(key, format!("apple:jti:{jti}")),
            None => assert!(key.starts_with("apple:event:") && key.len() == 12 + 64),
        }
        assert!(!notification.event.sub.is_empty());
    }
}

/// An id token's header, read before any key is fetched: the pinned algorithm and a
/// plain `kid`, or a refusal.
pub fn id_token_header(data: &[u8]) {
    let Some(token) = text(data) else { return };
    let rules = upcoach_auth::oidc::IdTokenRules::rs256(
        ["https://accounts.google.com"],
        ["fuzz.apps.googleusercontent.com"],
    );
    if let Ok((alg, kid)) = upcoach_auth::fuzzing::id_token_header(&rules, token) {
        // The one algorithm `IdTokenRules::rs256` pins.
        assert_eq!(format!("{alg:?}"), "RS256", "{token:?}");
        assert!(!kid.is_empty() && kid.len() <= 128, "{kid:?}");
        assert!(
            kid.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
            "{kid:?}"
        );
    }
}

/// A callback's form body (Apple's `form_post`), the Facebook callbacks' form, and the
/// `user` JSON Apple posts with the first authorization.
pub fn callback_form(data: &[u8]) {
    let params = upcoach_auth::web::CallbackParams::from_form(data);
    for value in [
        &params.state,
        &params.code,
        &params.error,
        &params.iss,
        &params.user,
    ]
    .into_iter()
    .flatten()
    {
        assert!(value.len() <= 3 * data.len());
    }
    if let Some(user) = &params.user
        && let Some(name) = upcoach_auth::web::posted_name(user)
    {
        assert!(!name.is_empty() && name.len() <= user.len());
    }
    if let Ok(field) = upcoach_auth::fuzzing::signed_request_field(data) {
        assert!(field.len() <= 3 * data.len());
    }
}

/// Appended to the value of every secret variable by [`server_config`]: no error and no
/// `Debug` may show it.
const SECRET_MARK: &str = "\u{1F511}fuzz-secret-mark";

/// The reference server's settings from `NAME=value` lines: settings or a list of
/// problems, and neither shows a secret's value.
pub fn server_config(data: &[u8]) {
    use upcoach_core::config::Settings;
    let Some(text) = text(data) else { return };
    // The mark must come only from a secret's value: an input that already holds it (the
    // fuzzer learns it from the comparisons) would show it in a plain variable's error.
    if text.contains(SECRET_MARK) {
        return;
    }
    let secret = |name: &str| {
        name.contains("SECRET") || name.contains("PRIVATE_KEY") || name.contains("SIGNING_KEY")
    };
    let vars: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| {
            let value = if secret(name) {
                format!("{value}{SECRET_MARK}")
            } else {
                value.to_owned()
            };
            (name.to_owned(), value)
        })
        .collect();
    let lookup = |name: &str| vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    match upcoach_server::ServerConfig::from_lookup(lookup) {
        Ok(config) => {
            let debug = format!("{config:?}");
            assert!(!debug.contains(SECRET_MARK), "{debug}");
        }
        Err(errors) => {
            let shown = format!("{errors} {errors:?}");
            assert!(!shown.contains(SECRET_MARK), "{shown}");
            assert!(errors.variables().next().is_some());
        }
    }
}

/// The reference server, in memory, with Apple and Facebook configured against
/// addresses that refuse connections, `--dev`, and no rate limits.
struct Server {
    runtime: tokio::runtime::Runtime,
    app: Arc<upcoach_server::App>,
    /// An admin's access token: `@TOKEN@` in an input stands for it.
    token: String,
}

/// Set by the panic hook [`server`] installs: a panic in a task the runtime runs (a
/// connection's, a WebSocket's) is caught by Tokio, so the target looks here.
static PANICKED: AtomicBool = AtomicBool::new(false);

/// The configuration of [`server`].
const SERVER_ENV: &[(&str, &str)] = &[
    (
        "AUTH_SIGNING_KEY",
        "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc",
    ),
    ("RATE_LIMIT_ENABLED", "false"),
    ("UPCOACH_PUBLIC_URL", "http://127.0.0.1:8080"),
    ("AUTH_RETURN_TO_ALLOWLIST", "http://app.example.test/"),
    ("APPLE_WEB_CLIENT_ID", "com.example.fuzz.web"),
    ("APPLE_MOBILE_CLIENT_ID", "com.example.fuzz"),
    ("APPLE_TEAM_ID", upcoach_testing::apple::TEST_TEAM_ID),
    ("APPLE_KEY_ID", upcoach_testing::apple::TEST_KEY_ID),
    (
        "APPLE_PRIVATE_KEY",
        upcoach_testing::apple::TEST_TEAM_PRIVATE_KEY,
    ),
    // Port 9 (discard) refuses at once: a provider call fails fast.
    ("APPLE_AUTH_URL", "http://127.0.0.1:9/auth/authorize"),
    ("APPLE_TOKEN_URL", "http://127.0.0.1:9/auth/token"),
    ("APPLE_KEYS_URL", "http://127.0.0.1:9/auth/keys"),
    ("FACEBOOK_APP_ID", "1234567890"),
    ("FACEBOOK_APP_SECRET", FACEBOOK_APP_SECRET),
    ("FACEBOOK_GRAPH_URL", "http://127.0.0.1:9/v23.0"),
    ("FACEBOOK_DIALOG_URL", "http://127.0.0.1:9/dialog/oauth"),
    ("FACEBOOK_LIMITED_LOGIN_JWKS_URL", "http://127.0.0.1:9/jwks"),
];

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            previous(info);
        }));
        use upcoach_core::config::Settings;
        let config = upcoach_server::ServerConfig::from_lookup(|name| {
            SERVER_ENV
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        })
        .expect("the fuzz server's settings read");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let options = upcoach_server::Options {
            dev: true,
            ..Default::default()
        };
        let app = runtime
            .block_on(upcoach_server::App::start(config, options))
            .expect("the fuzz server starts in memory");
        let sessions = app.sessions().expect("sign-in is configured").clone();
        let tokens = runtime
            .block_on(sessions.issue_for(
                upcoach_core::UserId::new(),
                &[upcoach_core::Role::ADMIN],
                &upcoach_core::event::ClientFacts::default(),
            ))
            .expect("an admin session");
        Server {
            runtime,
            app,
            token: tokens.access_token,
        }
    })
}

/// `data` with every `@TOKEN@` replaced by the admin's access token and every
/// `@FBSR@` by a `signed_request` that Facebook would send.
fn substitute(data: &[u8], token: &str) -> Vec<u8> {
    let signed = facebook_sign(&base64url(
        br#"{"algorithm":"HMAC-SHA256","user_id":"10101","issued_at":1765000000}"#,
    ));
    let mut out = Vec::with_capacity(data.len());
    let mut rest = data;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix(b"@TOKEN@") {
            out.extend_from_slice(token.as_bytes());
            rest = after;
        } else if let Some(after) = rest.strip_prefix(b"@FBSR@") {
            out.extend_from_slice(signed.as_bytes());
            rest = after;
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

/// The request the server reads: the input's head (up to the first blank line) with
/// its `Content-Length` set to the rest's length, so that the body is what the input
/// holds; after a WebSocket upgrade's head, the rest goes as it is (frames).
fn framed(data: &[u8]) -> Vec<u8> {
    let split = data.windows(4).position(|w| w == b"\r\n\r\n");
    let Some(at) = split else {
        return data.to_vec();
    };
    let (head, body) = (&data[..at], &data[at + 4..]);
    let lower = head.to_ascii_lowercase();
    let mut out = Vec::with_capacity(data.len() + 32);
    for line in head.split(|b| *b == b'\n') {
        if !line.to_ascii_lowercase().starts_with(b"content-length:") {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    out.truncate(out.len() - 1);
    if !lower.windows(9).any(|w| w == b"websocket") {
        out.extend_from_slice(format!("\r\ncontent-length: {}", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body);
    out
}

/// Raw HTTP/1.1 from a client, through hyper to the reference server's routes: every
/// route's path parameters, queries, headers, JSON and form bodies, SSE's
/// `Last-Event-ID` and a WebSocket's frames after its upgrade. No request makes a
/// handler panic or answer 500.
pub fn server_request(data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = server();
    let request = framed(&substitute(data, &server.token));
    let service = server.app.service();
    let answer = server.runtime.block_on(async move {
        let (mut client, io) = tokio::io::duplex(64 * 1024);
        let peer = std::net::SocketAddr::from(([192, 0, 2, 7], 40_000));
        let service = hyper::service::service_fn(move |mut request| {
            request
                .extensions_mut()
                .insert(upcoach_core::http::ClientAddr(peer));
            hyper::service::Service::call(&service, request)
        });
        let connection = tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                .with_upgrades(),
        );
        let (mut reader, mut writer) = tokio::io::split(&mut client);
        let write = async {
            let _ = writer.write_all(&request).await;
            let _ = writer.shutdown().await;
        };
        let read = async {
            let mut answer = Vec::new();
            let mut buf = [0u8; 16 * 1024];
            // A stream (SSE, a WebSocket) never ends: read until it pauses.
            let mut wait = Duration::from_secs(5);
            while let Ok(Ok(n)) = tokio::time::timeout(wait, reader.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buf[..n]);
                wait = Duration::from_millis(50);
            }
            answer
        };
        let ((), answer) = tokio::join!(write, read);
        connection.abort();
        answer
    });
    assert!(!PANICKED.load(Ordering::SeqCst), "a task panicked");
    let status_500 = answer
        .split(|b| *b == b'\n')
        .any(|line| line.starts_with(b"HTTP/1.1 500"));
    assert!(!status_500, "{}", String::from_utf8_lossy(&answer));
}
