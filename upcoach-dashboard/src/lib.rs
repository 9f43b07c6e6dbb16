//! The live dashboard page: plain HTML, CSS and JavaScript, embedded in the binary at
//! build time (no build step, no CDN, works offline), served under [`PATH`] with a strict
//! Content-Security-Policy ([`CONTENT_SECURITY_POLICY`]: no inline script or style, no
//! other origin).
//!
//! The page signs in with each configured provider (or with `POST /dev/token` when
//! [`DashboardConfig::dev_sign_in`] is on), then follows the rooms in [`ROOMS`] over
//! Server-Sent Events: request rate and p95 latency per route, connection counts, cache
//! hit rates, pool waiters, firing alerts and security events. It resumes by
//! `Last-Event-ID` after a disconnect, and counts any hole in a room's sequence numbers.
//! It talks to the routes of the reference server's API (`/auth/...` and
//! `/api/dashboard/realtime/...`), so a host that mounts it serves those routes on the
//! same origin.
//!
//! A host hands every request whose path is under [`PATH`] to [`Dashboard::answer`]:
//!
//! ```
//! use http::{HeaderMap, Method, StatusCode};
//! use upcoach_dashboard::{Dashboard, DashboardConfig};
//!
//! let dashboard = Dashboard::new(&DashboardConfig {
//!     providers: vec!["google".into()],
//!     dev_sign_in: false,
//! });
//! let page: http::Response<bytes::Bytes> = dashboard
//!     .answer(&Method::GET, "/dashboard", &HeaderMap::new())
//!     .expect("the page is under /dashboard");
//! assert_eq!(page.status(), StatusCode::OK);
//! assert!(page.headers()["content-security-policy"]
//!     .to_str()?
//!     .contains("script-src 'self'"));
//!
//! // The page asks for its settings, and revalidates its files by ETag.
//! let config: http::Response<bytes::Bytes> = dashboard
//!     .answer(&Method::GET, "/dashboard/config.json", &HeaderMap::new())
//!     .unwrap();
//! assert_eq!(&config.body()[..], br#"{"providers":["google"],"dev_sign_in":false}"#);
//! let mut headers = HeaderMap::new();
//! headers.insert("if-none-match", page.headers()["etag"].clone());
//! let again: http::Response<bytes::Bytes> =
//!     dashboard.answer(&Method::GET, "/dashboard", &headers).unwrap();
//! assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
//!
//! // Paths outside it are the host's.
//! assert!(dashboard.answer::<bytes::Bytes>(&Method::GET, "/health", &HeaderMap::new()).is_none());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use serde::Serialize;
use sha2::{Digest, Sha256};
use upcoach_core::http::{ApiError, error_response};

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// Where the page lives: `GET /dashboard` is the page, `GET /dashboard/<file>` its files.
pub const PATH: &str = "/dashboard";

/// The rooms the page follows; each needs the `admin` role under the default access rules.
pub const ROOMS: [&str; 3] = ["metrics", "alerts", "security"];

/// Sent with every answer under [`PATH`]: scripts, styles and connections from this
/// origin only, nothing inline, no frames, no plugins, no `<base>`, no form posts.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// What the page offers at sign-in; served to it as `/dashboard/config.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DashboardConfig {
    /// The providers with a "Sign in with ..." button, by their route name (`google`,
    /// `apple`, `facebook`, or a generic OpenID provider's name). A button starts
    /// `GET /auth/{provider}/authorize?platform=web&return_to=<origin>/dashboard`, so the
    /// page's own URL must be in the server's `AUTH_RETURN_TO_ALLOWLIST`.
    pub providers: Vec<String>,
    /// Whether to offer "Sign in with a dev token" (`POST /dev/token` with role
    /// `admin`): only for a server started with `--dev`.
    pub dev_sign_in: bool,
}

/// One embedded file.
#[derive(Debug, Clone)]
struct File {
    /// The path under [`PATH`], with its leading `/` (`""` for the page itself).
    name: &'static str,
    content_type: &'static str,
    body: Bytes,
    /// A strong validator: the body's SHA-256, quoted.
    etag: HeaderValue,
}

impl File {
    fn new(name: &'static str, content_type: &'static str, body: Bytes) -> Self {
        let digest = Sha256::digest(&body);
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        let etag = HeaderValue::from_str(&format!("\"{hex}\""))
            .unwrap_or_else(|_| unreachable!("hex digits make a valid header value"));
        File {
            name,
            content_type,
            body,
            etag,
        }
    }
}

/// The page and its files, ready to answer.
///
/// Cheap to clone (the bodies are shared [`Bytes`]).
#[derive(Debug, Clone)]
pub struct Dashboard {
    files: Vec<File>,
}

impl Dashboard {
    /// The page with `config` as its settings.
    pub fn new(config: &DashboardConfig) -> Self {
        let config = serde_json::to_vec(config)
            .unwrap_or_else(|_| unreachable!("a list of strings and a bool serialize"));
        let file = |name, content_type, body: &'static [u8]| {
            File::new(name, content_type, Bytes::from_static(body))
        };
        Dashboard {
            files: vec![
                file(
                    "",
                    "text/html; charset=utf-8",
                    include_bytes!("../assets/index.html"),
                ),
                file(
                    "/dashboard.js",
                    "text/javascript; charset=utf-8",
                    include_bytes!("../assets/dashboard.js"),
                ),
                file(
                    "/dashboard.css",
                    "text/css; charset=utf-8",
                    include_bytes!("../assets/dashboard.css"),
                ),
                file(
                    "/icon.svg",
                    "image/svg+xml",
                    include_bytes!("../assets/icon.svg"),
                ),
                File::new("/config.json", "application/json", Bytes::from(config)),
            ],
        }
    }

    /// The answer to a request for `path`, or `None` when `path` is not under [`PATH`].
    ///
    /// `GET` and `HEAD` get the file (`200`, or `304` when `If-None-Match` names its
    /// ETag); other methods `405` with `Allow`; an unknown file `404`. Every answer
    /// carries [`CONTENT_SECURITY_POLICY`], `X-Content-Type-Options: nosniff`,
    /// `Referrer-Policy: no-referrer` (a sign-in's one-time `login_code` arrives in the
    /// page's URL), `X-Frame-Options: DENY`, `Cross-Origin-Opener-Policy: same-origin`
    /// and `Cache-Control: no-cache` (always revalidated, so a new build shows at once).
    pub fn answer<B: From<Bytes>>(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<Response<B>> {
        let rest = path.strip_prefix(PATH)?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        let rest = if rest == "/" { "" } else { rest };
        let mut response = if method != Method::GET && method != Method::HEAD {
            let mut response = error_response(&ApiError::method_not_allowed("GET, HEAD"));
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            response
        } else {
            match self.files.iter().find(|file| file.name == rest) {
                None => error_response(&ApiError::not_found()),
                Some(file) => serve(file, headers),
            }
        };
        let out = response.headers_mut();
        for (name, value) in SECURITY_HEADERS {
            out.insert(name, HeaderValue::from_static(value));
        }
        Some(response)
    }
}

/// The headers of every answer under [`PATH`].
const SECURITY_HEADERS: [(HeaderName, &str); 6] = [
    (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (
        HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    ),
    (header::CACHE_CONTROL, "no-cache"),
];

fn serve<B: From<Bytes>>(file: &File, headers: &HeaderMap) -> Response<B> {
    let fresh = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .any(|value| matches(value, &file.etag));
    let (status, body) = if fresh {
        (StatusCode::NOT_MODIFIED, Bytes::new())
    } else {
        (StatusCode::OK, file.body.clone())
    };
    let mut response = Response::new(B::from(body));
    *response.status_mut() = status;
    let out = response.headers_mut();
    out.insert(header::ETAG, file.etag.clone());
    if !fresh {
        out.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(file.content_type),
        );
    }
    response
}

/// Whether an `If-None-Match` value names `etag` (weakly, as RFC 9110 says for it), or is
/// `*`.
fn matches(value: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(value) = value.to_str() else {
        return false;
    };
    let etag = etag.as_bytes();
    value
        .split(',')
        .map(str::trim)
        .any(|candidate| candidate == "*" || candidate.trim_start_matches("W/").as_bytes() == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dashboard() -> Dashboard {
        Dashboard::new(&DashboardConfig {
            providers: vec!["google".into(), "apple".into()],
            dev_sign_in: true,
        })
    }

    fn get(path: &str) -> Response<Bytes> {
        dashboard()
            .answer(&Method::GET, path, &HeaderMap::new())
            .unwrap_or_else(|| panic!("{path} is the dashboard's"))
    }

    #[test]
    fn every_file_is_served_with_its_type_and_the_security_headers() {
        for (path, content_type, needle) in [
            ("/dashboard", "text/html; charset=utf-8", "<!doctype html>"),
            ("/dashboard/", "text/html; charset=utf-8", "<!doctype html>"),
            (
                "/dashboard/dashboard.js",
                "text/javascript; charset=utf-8",
                "EventSource",
            ),
            ("/dashboard/dashboard.css", "text/css; charset=utf-8", "{"),
            (
                "/dashboard/config.json",
                "application/json",
                r#""providers":["google","apple"]"#,
            ),
        ] {
            let response = get(path);
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(response.headers()["content-type"], content_type, "{path}");
            let body = String::from_utf8_lossy(response.body());
            assert!(body.contains(needle), "{path} holds {needle:?}");
            for (name, value) in &SECURITY_HEADERS {
                assert_eq!(response.headers()[name], *value, "{path}: {name}");
            }
        }
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_and_loads_only_its_own_files() {
        let html = String::from_utf8(get("/dashboard").body().to_vec()).unwrap();
        assert!(!html.contains("style="), "no inline style attribute");
        assert!(!html.contains("<style"), "no style element");
        // No inline event handler: no attribute named on<something> inside a tag.
        for tag in html.split('<').skip(1) {
            let tag = tag.split('>').next().unwrap_or_default();
            let handler = tag.split_whitespace().skip(1).find(|attribute| {
                let name = attribute.split('=').next().unwrap_or_default();
                name.len() > 2 && name.starts_with("on")
            });
            assert_eq!(handler, None, "an inline handler in <{tag}>");
        }
        let scripts: Vec<&str> = html.split("<script").skip(1).collect();
        assert_eq!(scripts.len(), 1, "one script element");
        assert!(scripts[0].starts_with(r#" src="/dashboard/dashboard.js""#));
        assert!(!html.contains("http://") && !html.contains("https://"));
    }

    #[test]
    fn an_unknown_file_is_404_and_another_method_is_405_with_allow() {
        let missing = get("/dashboard/secret.txt");
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            missing.headers()["content-security-policy"],
            CONTENT_SECURITY_POLICY
        );
        let body: serde_json::Value = serde_json::from_slice(missing.body()).unwrap();
        assert_eq!(body["error"]["code"], "not_found");

        let posted: Response<Bytes> = dashboard()
            .answer(&Method::POST, "/dashboard", &HeaderMap::new())
            .unwrap();
        assert_eq!(posted.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(posted.headers()["allow"], "GET, HEAD");
    }

    #[test]
    fn paths_that_only_begin_like_the_dashboard_are_not_its() {
        for path in ["/dashboards", "/dashboard.js", "/", "/api/dashboard"] {
            assert!(
                dashboard()
                    .answer::<Bytes>(&Method::GET, path, &HeaderMap::new())
                    .is_none(),
                "{path}"
            );
        }
    }

    #[test]
    fn if_none_match_gets_304_for_its_etag_only() {
        let etag = get("/dashboard/dashboard.js").headers()["etag"].clone();
        let ask = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::IF_NONE_MATCH, HeaderValue::from_str(value).unwrap());
            dashboard()
                .answer::<Bytes>(&Method::GET, "/dashboard/dashboard.js", &headers)
                .unwrap()
        };
        let tag = etag.to_str().unwrap();
        for fresh in [tag.to_owned(), format!("W/{tag}"), format!("\"x\", {tag}")] {
            let response = ask(&fresh);
            assert_eq!(response.status(), StatusCode::NOT_MODIFIED, "{fresh}");
            assert!(response.body().is_empty());
            assert_eq!(response.headers()["etag"], etag);
        }
        assert_eq!(ask("*").status(), StatusCode::NOT_MODIFIED);
        assert_eq!(ask("\"other\"").status(), StatusCode::OK);
        // Another file's tag is not this one's.
        let css = get("/dashboard/dashboard.css").headers()["etag"].clone();
        assert_ne!(css, etag);
        assert_eq!(ask(css.to_str().unwrap()).status(), StatusCode::OK);
    }

    #[test]
    fn the_settings_follow_the_config() {
        let plain = Dashboard::new(&DashboardConfig::default());
        let response: Response<Bytes> = plain
            .answer(&Method::GET, "/dashboard/config.json", &HeaderMap::new())
            .unwrap();
        assert_eq!(
            &response.body()[..],
            br#"{"providers":[],"dev_sign_in":false}"#
        );
    }
}
