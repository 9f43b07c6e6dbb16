//! An HTTP/1.1 client, a browser signing in, and the axum example or the reference
//! server started against a test OpenID provider.
// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use upcoach_core::config::Settings;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use upcoach_auth::config::AuthConfig;
use upcoach_axum_example::{App, CappedListener, Peer};
use upcoach_core::http::protect::LimitConfig;
use upcoach_realtime::HubConfig;
use upcoach_testing::OidcProvider;

pub(crate) const CLIENT_ID: &str = "upcoach-test-client";
pub(crate) const RETURN_TO: &str = "http://app.example.test/signed-in";

/// The variables of a server listening on `addr`, configured by `env` (its providers'
/// variables) and its address, public URL, [`RETURN_TO`] allowed and a signing key.
fn lookup(addr: SocketAddr, env: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
    let mut all = vec![
        ("UPCOACH_ADDR", addr.to_string()),
        ("UPCOACH_PUBLIC_URL", format!("http://{addr}")),
        ("AUTH_RETURN_TO_ALLOWLIST", RETURN_TO.to_owned()),
        ("AUTH_SIGNING_KEY", URL_SAFE_NO_PAD.encode([7u8; 32])),
    ];
    all.extend(env);
    move |name| all.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
}

/// The variables that make `provider` Google, with client [`CLIENT_ID`].
pub(crate) fn google_env(provider: &OidcProvider) -> Vec<(&'static str, String)> {
    provider.google_env(CLIENT_ID, "test-secret")
}

/// The axum example on a free port signing in with the providers `env` configures
/// (see [`lookup`] for the rest), with `limits` and behind its [`CappedListener`] as
/// `main` serves it; it stops with the test's runtime.
pub(crate) async fn start_axum_with_env(
    env: Vec<(&'static str, String)>,
    dev: bool,
    limits: &LimitConfig,
) -> (SocketAddr, Arc<App>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let auth = AuthConfig::from_lookup(lookup(addr, env)).unwrap();
    serve(listener, &auth, dev, limits).await
}

/// The axum example on a free port with Facebook Login pointed at `graph` (started for
/// the app [`FACEBOOK_APP_ID`] and [`FACEBOOK_APP_SECRET`]); it stops with the test's
/// runtime.
pub(crate) async fn start_axum_facebook(
    graph: &upcoach_testing::facebook::FacebookStandIn,
) -> (SocketAddr, Arc<App>) {
    start_axum_with_env(graph.env(), false, &LimitConfig::default()).await
}

/// [`start_axum_facebook`] with Google beside Facebook, pointed at `google` (client
/// [`CLIENT_ID`]), for a user who signs in with one and links the other.
pub(crate) async fn start_axum_facebook_and_google(
    graph: &upcoach_testing::facebook::FacebookStandIn,
    google: &OidcProvider,
) -> (SocketAddr, Arc<App>) {
    let env = [graph.env(), google_env(google)].concat();
    start_axum_with_env(env, false, &LimitConfig::default()).await
}

/// The Facebook app of [`start_axum_facebook`].
pub(crate) const FACEBOOK_APP_ID: &str = "1234567890";
/// Its secret.
pub(crate) const FACEBOOK_APP_SECRET: &str = "stand-in-app-secret";

/// The Services ID of [`start_axum_apple`]'s Sign in with Apple on the web.
pub(crate) const APPLE_WEB_CLIENT: &str = "com.example.web";
/// The bundle id of its native app.
pub(crate) const APPLE_APP_CLIENT: &str = "com.example.app";

/// The axum example on a free port with Sign in with Apple pointed at `apple` (the
/// test team key, [`APPLE_WEB_CLIENT`] and [`APPLE_APP_CLIENT`]) and, when given,
/// Google at `google`; it stops with the test's runtime.
pub(crate) async fn start_axum_apple(
    apple: &upcoach_testing::apple::AppleStandIn,
    google: Option<&OidcProvider>,
) -> (SocketAddr, Arc<App>) {
    let mut env = apple.env(APPLE_WEB_CLIENT, APPLE_APP_CLIENT);
    env.extend(google.map(google_env).unwrap_or_default());
    start_axum_with_env(env, false, &LimitConfig::default()).await
}

/// The axum example on a free port; it stops with the test's runtime.
pub(crate) async fn start_axum(provider: &OidcProvider, dev: bool) -> (SocketAddr, Arc<App>) {
    start_axum_with(provider, dev, &LimitConfig::default()).await
}

/// [`start_axum`] with `limits`, behind its [`CappedListener`] as `main` serves it.
pub(crate) async fn start_axum_with(
    provider: &OidcProvider,
    dev: bool,
    limits: &LimitConfig,
) -> (SocketAddr, Arc<App>) {
    start_axum_with_env(google_env(provider), dev, limits).await
}

/// The axum example with `auth` on `listener`, behind its [`CappedListener`] as `main`
/// serves it.
async fn serve(
    listener: TcpListener,
    auth: &AuthConfig,
    dev: bool,
    limits: &LimitConfig,
) -> (SocketAddr, Arc<App>) {
    let addr = listener.local_addr().unwrap();
    let threats = Default::default();
    let app = App::new(auth, HubConfig::default(), limits, &threats, addr, dev)
        .await
        .expect("app");
    let app = Arc::new(app);
    let service =
        upcoach_axum_example::router(app.clone()).into_make_service_with_connect_info::<Peer>();
    let listener = CappedListener::new(listener, limits.connection_limits());
    tokio::spawn(async move { axum::serve(listener, service).await });
    (addr, app)
}

/// The reference server on a free port; it stops with the test's runtime.
pub(crate) async fn start_server(provider: &OidcProvider) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config =
        upcoach_server::ServerConfig::from_lookup(lookup(addr, google_env(provider))).unwrap();
    let app = upcoach_server::App::start(config, Default::default())
        .await
        .expect("server");
    let serving = upcoach_server::serve(
        listener,
        app.service(),
        std::future::pending(),
        Default::default(),
    );
    tokio::spawn(serving);
    addr
}

pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Answer {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }

    pub(crate) fn location(&self) -> url::Url {
        url::Url::parse(self.headers["location"].to_str().unwrap()).unwrap()
    }

    /// Its cookies as a browser sends them back: each `Set-Cookie`'s `name=value`,
    /// joined by `; `.
    pub(crate) fn cookies(&self) -> String {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|c| c.to_str().unwrap().split(';').next().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The cookies a browser sends back on a cross-site `POST` (a provider's
    /// `form_post`): those set `SameSite=None`, joined by `; `.
    pub(crate) fn cross_site_cookies(&self) -> String {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|c| c.to_str().unwrap())
            .filter(|c| c.split(';').any(|a| a.trim() == "SameSite=None"))
            .map(|c| c.split(';').next().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The `Set-Cookie` header that sets cookie `name`.
    pub(crate) fn set_cookie(&self, name: &str) -> String {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|c| c.to_str().unwrap().to_owned())
            .find(|c| c.starts_with(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} cookie set: {:?}", self.headers))
    }

    /// The error code of an error answer ("" for another).
    pub(crate) fn code(&self) -> String {
        let json: Value = serde_json::from_slice(&self.body).unwrap_or_default();
        json["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// One HTTP/1.1 request to `url` on a new connection, no redirects followed.
pub(crate) async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let url = url::Url::parse(url).unwrap();
    let stream = tokio::net::TcpStream::connect(url.socket_addrs(|| None).unwrap()[0])
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let mut request = http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", url.authority());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let (parts, body) = sender.send_request(request).await.unwrap().into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// A browser signing in with Google at the server on `addr`; every request carries
/// `user_agent`.
pub(crate) struct Browser {
    pub(crate) addr: SocketAddr,
    pub(crate) user_agent: &'static str,
    pub(crate) cookie: Option<String>,
}

impl Browser {
    async fn send(&self, method: Method, url: &str, json: Option<&Value>) -> Answer {
        let mut headers = vec![("user-agent", self.user_agent)];
        headers.extend(self.cookie.iter().map(|c| ("cookie", c.as_str())));
        let body = json.map(Value::to_string).unwrap_or_default();
        if json.is_some() {
            headers.push(("content-type", "application/json"));
        }
        send(method, url, &headers, &body).await
    }

    /// Authorize (with `query`), the provider (signing in as `claims`), and our callback:
    /// the callback's answer.
    pub(crate) async fn sign_in(&mut self, query: &str, claims: &Value) -> Answer {
        let url = format!("http://{}/auth/google/authorize?{query}", self.addr);
        let started = self.send(Method::GET, &url, None).await;
        assert_eq!(started.status, StatusCode::FOUND, "{:?}", started.body);
        let set_cookie = started.headers["set-cookie"].to_str().unwrap();
        self.cookie = Some(set_cookie.split(';').next().unwrap().to_owned());
        let mut to_provider = started.location();
        let hint = URL_SAFE_NO_PAD.encode(claims.to_string());
        to_provider
            .query_pairs_mut()
            .append_pair("login_hint", &hint);
        let at_provider = send(Method::GET, to_provider.as_str(), &[], "").await;
        assert_eq!(
            at_provider.status,
            StatusCode::FOUND,
            "{:?}",
            at_provider.body
        );
        self.send(Method::GET, at_provider.location().as_str(), None)
            .await
    }

    /// `POST /auth/exchange` with this browser's flow cookie.
    pub(crate) async fn exchange(&self, login_code: &str) -> Answer {
        let url = format!("http://{}/auth/exchange", self.addr);
        let body = serde_json::json!({ "login_code": login_code });
        self.send(Method::POST, &url, Some(&body)).await
    }
}

pub(crate) fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
