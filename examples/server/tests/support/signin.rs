//! Signing in through a provider's redirects, as a browser does ([`Browser`]) or as a
//! native app gets its id token ([`oidc_id_token`]), against an OpenID provider
//! stand-in (`upcoach_testing::OidcProvider`) or a provider of a test's own; and the
//! auth routes a test calls directly ([`Running::link`] and the others).

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, Method, StatusCode};
use serde_json::{Value, json};
use upcoach_core::event::{Event, EventKind};

use super::{Answer, RETURN_TO, Running, send};

/// Google's client id where an OpenID provider stand-in is Google ([`google_env`]).
pub(crate) const GOOGLE_CLIENT: &str = "upcoach-test-client";

/// The auth routes a test drives besides the browser's.
impl Running {
    /// `POST /auth/{provider}/token` `body`: a native app's sign-in.
    pub(crate) async fn sign_in_native(&self, provider: &str, body: Value) -> Answer {
        let path = format!("/auth/{provider}/token");
        self.send(Method::POST, &path, Some(body), None).await
    }

    /// `POST /auth/link/{provider}` `body` (as `/token`'s) with the bearer `access`.
    pub(crate) async fn link(&self, provider: &str, body: Value, access: &str) -> Answer {
        let path = format!("/auth/link/{provider}");
        self.send(Method::POST, &path, Some(body), Some(access))
            .await
    }

    /// `DELETE /auth/link/{provider}` with the bearer `access`.
    pub(crate) async fn unlink(&self, provider: &str, access: &str) -> Answer {
        let path = format!("/auth/link/{provider}");
        self.send(Method::DELETE, &path, None, Some(access)).await
    }

    /// The last 200 security events the server recorded.
    pub(crate) async fn security_events(&self) -> Vec<Event> {
        self.app
            .event_log()
            .recent(EventKind::Security, 200)
            .await
            .expect("the event log answers")
    }
}

/// The variables that make `provider` (an OpenID provider stand-in) Google, with client
/// id [`GOOGLE_CLIENT`].
pub(crate) fn google_env(provider: &upcoach_testing::OidcProvider) -> Vec<(&'static str, String)> {
    provider.google_env(GOOGLE_CLIENT, "google-secret")
}

/// `value` percent-encoded for a query or a form.
pub(crate) fn urlencode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// The query parameter `name` of `url`.
pub(crate) fn param(url: &url::Url, name: &str) -> String {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("no {name} in {url}"))
}

/// `claims` as the OpenID provider stand-in's `login_hint`: whom it signs in.
pub(crate) fn hint(claims: &Value) -> String {
    URL_SAFE_NO_PAD.encode(claims.to_string())
}

/// The login code of a callback's redirect back to the web app at [`RETURN_TO`].
pub(crate) fn login_code(landed: &Answer) -> String {
    assert_eq!(landed.status, StatusCode::FOUND, "{:?}", landed.body);
    let back = landed.location();
    assert!(back.as_str().starts_with(RETURN_TO), "{back}");
    param(&back, "login_code")
}

/// A browser signing in: our authorize → the provider → our callback. It keeps the
/// cookies the server sets on it, each by name, removed by `Max-Age=0`, and sends them
/// back on each request to the server (only the `SameSite=None` ones on a cross-site
/// `POST`).
#[derive(Debug, Default, Clone)]
pub(crate) struct Browser {
    /// The `Cookie` header it sends the server.
    cookie: Option<String>,
    /// The names of its cookies set `SameSite=None`.
    cross_site: Vec<String>,
}

impl Browser {
    /// A browser holding only the cookie `name=value`.
    pub(crate) fn holding(name: &str, value: &str) -> Self {
        Self {
            cookie: Some(format!("{name}={value}")),
            cross_site: Vec::new(),
        }
    }

    /// The `Cookie` header it sends the server, if it holds any cookie.
    pub(crate) fn cookie(&self) -> Option<&str> {
        self.cookie.as_deref()
    }

    /// Keeps the cookies `headers` set.
    pub(crate) fn keep(&mut self, headers: &HeaderMap) {
        let mut jar: Vec<(String, String)> = self
            .cookie
            .iter()
            .flat_map(|c| c.split("; "))
            .filter_map(|pair| pair.split_once('='))
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect();
        for set in headers.get_all("set-cookie") {
            let set = set.to_str().unwrap();
            let (name, value) = set.split(';').next().unwrap().split_once('=').unwrap();
            jar.retain(|(n, _)| n != name);
            self.cross_site.retain(|n| n != name);
            if !set.contains("Max-Age=0") {
                jar.push((name.to_owned(), value.to_owned()));
                if set.contains("SameSite=None") {
                    self.cross_site.push(name.to_owned());
                }
            }
        }
        self.cookie = (!jar.is_empty()).then(|| {
            jar.iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("; ")
        });
    }

    /// The value of its cookie `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.cookie
            .as_deref()?
            .split("; ")
            .filter_map(|pair| pair.split_once('='))
            .find_map(|(n, v)| (n == name).then_some(v))
    }

    /// The headers of a request from this browser to the server: its cookies.
    pub(crate) fn headers(&self) -> Vec<(&str, &str)> {
        self.cookie.iter().map(|c| ("cookie", c.as_str())).collect()
    }

    /// The `Cookie` header of a cross-site `POST` to the server (a provider's
    /// `form_post`): its `SameSite=None` cookies only.
    pub(crate) fn cross_site_cookie(&self) -> Option<String> {
        let sent: Vec<String> = self
            .cross_site
            .iter()
            .filter_map(|name| Some(format!("{name}={}", self.get(name)?)))
            .collect();
        (!sent.is_empty()).then(|| sent.join("; "))
    }

    /// `GET /auth/{provider}/authorize?{query}`: asserts the redirect to the provider
    /// and that every cookie set is `HttpOnly`, and keeps them. The redirect.
    pub(crate) async fn authorize(
        &mut self,
        server: &Running,
        provider: &str,
        query: &str,
    ) -> Answer {
        let started = send(
            Method::GET,
            &server.url(&format!("/auth/{provider}/authorize?{query}")),
            &self.headers(),
            None,
        )
        .await;
        assert_eq!(started.status, StatusCode::FOUND, "{:?}", started.body);
        for set_cookie in started.headers.get_all("set-cookie") {
            let set_cookie = set_cookie.to_str().unwrap();
            assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
        }
        self.keep(&started.headers);
        started
    }

    /// An OpenID sign-in begun at `/auth/{provider}/authorize?{query}` (its cookies
    /// `SameSite=Lax`, the request to the provider with PKCE S256, a nonce and a state)
    /// and signed in at the provider stand-in as `claims`: the provider's redirect to
    /// our callback, not yet followed.
    pub(crate) async fn start(
        &mut self,
        server: &Running,
        provider: &str,
        query: &str,
        claims: &Value,
    ) -> url::Url {
        let started = self.authorize(server, provider, query).await;
        for set_cookie in started.headers.get_all("set-cookie") {
            let set_cookie = set_cookie.to_str().unwrap();
            assert!(set_cookie.contains("SameSite=Lax"), "{set_cookie}");
        }
        let mut to_provider = started.location();
        let params: HashMap<String, String> = to_provider.query_pairs().into_owned().collect();
        assert_eq!(params["code_challenge_method"], "S256");
        assert_eq!(params["response_type"], "code");
        assert_eq!(
            params["redirect_uri"],
            server.url(&format!("/auth/{provider}/callback"))
        );
        assert!(params["nonce"].len() >= 43 && params["state"].len() >= 43);
        to_provider
            .query_pairs_mut()
            .append_pair("login_hint", &hint(claims));
        let at_provider = send(Method::GET, to_provider.as_str(), &[], None).await;
        assert_eq!(
            at_provider.status,
            StatusCode::FOUND,
            "{:?}",
            at_provider.body
        );
        at_provider.location()
    }

    /// Follows the provider's redirect to our `callback`, with this browser's cookies.
    pub(crate) async fn callback(&self, callback: &url::Url) -> Answer {
        send(Method::GET, callback.as_str(), &self.headers(), None).await
    }

    /// [`start`](Self::start), then our callback: the callback's answer.
    pub(crate) async fn sign_in(
        &mut self,
        server: &Running,
        provider: &str,
        query: &str,
        claims: &Value,
    ) -> Answer {
        let callback = self.start(server, provider, query, claims).await;
        self.callback(&callback).await
    }

    /// `POST /auth/exchange` `body` from this browser.
    pub(crate) async fn exchange(&self, server: &Running, body: Value) -> Answer {
        send(
            Method::POST,
            &server.url("/auth/exchange"),
            &self.headers(),
            Some(body.to_string()),
        )
        .await
    }

    /// The web app's part once our callback `landed` it at [`RETURN_TO`] with a login
    /// code: `POST /auth/exchange` from this browser, keeping what it sets. The
    /// exchange's answer.
    pub(crate) async fn finish(&mut self, server: &Running, landed: &Answer) -> Answer {
        let code = login_code(landed);
        let exchanged = self.exchange(server, json!({ "login_code": code })).await;
        self.keep(&exchanged.headers);
        exchanged
    }

    /// A web sign-in with an OpenID `provider` as API.md has it: authorize with
    /// `return_to`, the provider as `claims`, our callback's redirect with a login code,
    /// and the exchange. The exchange's answer, or the callback's when it refused.
    pub(crate) async fn sign_in_web(
        &mut self,
        server: &Running,
        provider: &str,
        claims: &Value,
    ) -> Answer {
        let query = format!("platform=web&return_to={}", urlencode(RETURN_TO));
        let landed = self.sign_in(server, provider, &query, claims).await;
        if landed.status != StatusCode::FOUND {
            return landed;
        }
        self.finish(server, &landed).await
    }

    /// `POST /auth/refresh` `{"refresh_token"}` from this browser: with its cookies (its
    /// device cookie) and nothing else.
    pub(crate) async fn refresh(&self, server: &Running, refresh_token: &Value) -> Answer {
        server.refresh(refresh_token, &self.headers()).await
    }
}
