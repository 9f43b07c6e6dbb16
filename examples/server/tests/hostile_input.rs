//! Property tests of what the reference server reads from outside: its settings (any
//! values of the variables it reads are settings or a list of problems, neither showing
//! a secret) and its route parameters (any path segment, percent-encoded or not, is
//! decoded and validated: an answer of the route, or a 400, never a server error).

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use proptest::prelude::*;
use serde_json::Value;
use upcoach_core::config::Settings;
use upcoach_core::{Role, UserId};
use upcoach_server::{App, Options, ServerConfig};

/// Every variable the server's settings read, asked for with none set and with all
/// set (some are read only once another is).
fn variables() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let asked = RefCell::new(Vec::<String>::new());
        let record = |value: Option<&str>| {
            let _ = ServerConfig::from_lookup(|name| {
                let mut asked = asked.borrow_mut();
                if !asked.iter().any(|n| n == name) {
                    asked.push(name.to_owned());
                }
                value.map(str::to_owned)
            });
        };
        record(None);
        record(Some("x"));
        let names = asked.into_inner();
        assert!(names.len() > 40, "{names:?}");
        names
    })
}

/// Appended to every secret's value: it shows if the value is ever printed.
const MARK: &str = "\u{1F511}secret-mark";

/// Whether a variable holds a secret that no message may show.
fn secret(name: &str) -> bool {
    name.contains("SECRET") || name.contains("PRIVATE_KEY") || name.contains("SIGNING_KEY")
}

/// A value such as an operator might set, or any text.
fn values() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9]{0,12}",
        "-?[0-9]{1,25}(ms|s|m|h|d)?",
        "[0-9]{1,6}/[0-9]{1,4}(ms|s|m|h)?",
        "(true|false|on|off|yes|no|1|0|TRUE)",
        "(redis|rediss|redis\\+cluster|postgres|http|https|unix)://[a-z0-9:@/?&=.%\\[\\]-]{0,40}",
        "[a-z0-9.:,/ *\\[\\]-]{0,60}",
    ]
}

/// A running server in memory (with `--dev`), an admin's token, and the runtime that
/// drives both.
struct Server {
    runtime: tokio::runtime::Runtime,
    app: Arc<App>,
    token: String,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let config = ServerConfig::from_lookup(|name| {
            (name == "RATE_LIMIT_ENABLED").then(|| "false".to_owned())
        })
        .unwrap();
        let options = Options {
            dev: true,
            ..Default::default()
        };
        let app = runtime.block_on(App::start(config, options)).unwrap();
        let tokens = runtime
            .block_on(app.sessions().unwrap().issue_for(
                UserId::new(),
                &[Role::ADMIN],
                &Default::default(),
            ))
            .unwrap();
        Server {
            runtime,
            app,
            token: tokens.access_token,
        }
    })
}

/// One request through hyper to the server's routes, on a connection of its own: the
/// status and the error code (empty when it is no error).
fn send(method: Method, path: &str, body: &str) -> (StatusCode, String) {
    let server = server();
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .header("authorization", format!("Bearer {}", server.token))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let service = server.app.service();
    server.runtime.block_on(async move {
        let (client, io) = tokio::io::duplex(64 * 1024);
        let connection = tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .unwrap();
        let client = tokio::spawn(conn);
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        client.abort();
        connection.abort();
        let json: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let code = json["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        (status, code)
    })
}

/// A path segment as a client might send it: any text percent-encoded, or raw bytes
/// that are legal in a path, with percent escapes that may not decode to UTF-8.
fn segments() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>().prop_map(|s| utf8_percent_encode(&s, NON_ALPHANUMERIC).to_string()),
        "[A-Za-z0-9:@._~!$&'()*+,;=-]{1,40}",
        "([a-z:]{0,4}%[0-9A-Fa-f]{2}){1,6}",
        "[a-z]{120,140}",
    ]
}

proptest! {
    // No regression files written into the tree: a failing input found here is kept as
    // an explicit test beside these.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Any values of the server's variables: settings or problems, each naming a
    /// variable that was read, and no secret's value in a message or in the settings'
    /// `Debug`.
    #[test]
    fn any_settings_read_or_are_refused_without_showing_secrets(
        set in proptest::collection::vec((any::<prop::sample::Index>(), values()), 0..12),
    ) {
        let names = variables();
        let mut env: Vec<(String, String)> = Vec::new();
        for (index, value) in set {
            let name = names[index.index(names.len())].clone();
            // A secret carries a mark that shows if its value is ever printed.
            let value = if secret(&name) { format!("{value}{MARK}") } else { value };
            env.push((name, value));
        }
        // Names asked for: some are made from others' values (`OIDC_<NAME>_ISSUER`).
        let asked = RefCell::new(Vec::<String>::new());
        let lookup = |name: &str| {
            asked.borrow_mut().push(name.to_owned());
            env.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.clone())
        };
        match ServerConfig::from_lookup(lookup) {
            Ok(config) => {
                let debug = format!("{config:?}");
                prop_assert!(!debug.contains(MARK), "{}", debug);
            }
            Err(errors) => {
                let shown = format!("{errors}\n{errors:?}");
                prop_assert!(!shown.contains(MARK), "{}", shown);
                let asked = asked.borrow();
                for variable in errors.variables() {
                    prop_assert!(asked.iter().any(|n| n == variable), "{} is not read", variable);
                }
            }
        }
    }

    /// Any room in the broadcast route's path: published (202) exactly when the decoded
    /// room is valid, else 400; never a server error, never another route.
    #[test]
    fn any_broadcast_room_is_published_or_refused(segment in segments()) {
        let path = format!("/api/dashboard/realtime/broadcast/{segment}");
        let Ok(uri) = path.parse::<http::Uri>() else { return Ok(()) };
        let (status, code) = send(Method::POST, &uri.to_string(), r#"{"event":"update","data":{}}"#);
        let decoded = percent_encoding::percent_decode_str(&segment).decode_utf8();
        match decoded {
            // `/broadcast/` names no room: no route.
            Ok(room) if room.is_empty() && segment.is_empty() => {
                prop_assert_eq!(status, StatusCode::NOT_FOUND);
            }
            Err(_) => {
                prop_assert_eq!(status, StatusCode::BAD_REQUEST);
                prop_assert_eq!(code, "invalid_path");
            }
            Ok(room) if upcoach_realtime::validate_room(&room).is_ok() => {
                prop_assert_eq!(status, StatusCode::ACCEPTED, "{}", code);
            }
            Ok(_) => {
                prop_assert_eq!(status, StatusCode::BAD_REQUEST);
                prop_assert_eq!(code, "invalid_room");
            }
        }
    }

    /// Any provider and any deletion code in a path: a client error, never a server
    /// error (no provider is configured here).
    #[test]
    fn any_provider_or_code_in_a_path_is_a_client_error(segment in segments()) {
        for (method, path) in [
            (Method::GET, format!("/auth/{segment}/authorize")),
            (Method::POST, format!("/auth/{segment}/token")),
            (Method::POST, format!("/auth/link/{segment}")),
            (Method::DELETE, format!("/auth/link/{segment}")),
            (Method::GET, format!("/auth/facebook/data-deletion/{segment}")),
        ] {
            let Ok(uri) = path.parse::<http::Uri>() else { continue };
            let (status, code) = send(method, &uri.to_string(), "{}");
            prop_assert!(status.is_client_error(), "{} {}: {} {}", path, segment, status, code);
            prop_assert!(!code.is_empty());
        }
    }
}
